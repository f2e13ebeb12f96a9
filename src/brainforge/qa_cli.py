"""`brainforge qa countries OUT_DIR`: write the offline QA task for Search-R1 to disk.

OUT_DIR gets `docs/*.md` (one document per country, ALL countries: the memory store is the
knowledge source for training and held-out questions alike), `train.jsonl` and
`test.jsonl` (question, answer list, kind, country; readable by the `qa:jsonl` source).
A marker file records what the command wrote, so running it again replaces exactly those
files; a non-empty folder without the marker is refused, and no other file is touched.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import typer

from brainforge.errors import BrainforgeError

log = logging.getLogger(__name__)

qa_app = typer.Typer(no_args_is_help=True, help="Build QA tasks (questions, gold answers, documents) for Search-R1.")

MARKER = ".brainforge-qa.json"


@qa_app.command("countries")
def countries(
    out_dir: Path = typer.Argument(..., help="Folder to write docs/, train.jsonl and test.jsonl to.", show_default=False),
    seed: int = typer.Option(0, "--seed", help="Seed of the held-out country sample and of the question order."),
    eval_size: int = typer.Option(40, "--eval-size", min=0, help="Countries held out: none of their questions is a training question."),
) -> None:
    """Country questions from the `countryinfo` data, split by country, and one document per country."""
    from brainforge.data.qa import country_documents, country_qa, load_countries

    all_countries = load_countries()
    task = country_qa(seed=seed, eval_size=eval_size, countries=all_countries)
    documents = country_documents(all_countries)
    files = {f"docs/{name}": text for name, text in documents.items()}
    files["train.jsonl"] = "".join(json.dumps(item.to_json(), ensure_ascii=False) + "\n" for item in task.train)
    files["test.jsonl"] = "".join(json.dumps(item.to_json(), ensure_ascii=False) + "\n" for item in task.test)
    write_task(out_dir, files, {"command": "brainforge qa countries", "seed": seed, "eval_size": eval_size})

    typer.echo(f"{len(documents)} documents in {out_dir / 'docs'}")
    typer.echo(f"{len(task.train)} training questions in {out_dir / 'train.jsonl'}")
    typer.echo(f"{len(task.test)} held-out questions ({len(task.held_out)} countries) in {out_dir / 'test.jsonl'}")
    typer.echo(f"next: brainforge ingest {out_dir / 'docs'} --config CONFIG")


def write_task(out_dir: Path, files: dict[str, str], settings: dict[str, object]) -> None:
    """Write `files` (relative path -> text) under `out_dir`, which must be ours or empty.

    The marker is written first, listing every file about to be written, so an
    interrupted run leaves a folder this command recognises and finishes on the next run.
    Files a previous run wrote and this one does not are removed; nothing else ever is.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise BrainforgeError(f"{out_dir}: is a file; give a folder to write the QA task to")
    marker = out_dir / MARKER
    previous = _previous_files(out_dir, marker)
    if previous is None:
        raise BrainforgeError(f"{out_dir}: the folder is not empty and was not written by `brainforge qa`; "
                              "give a new or empty folder (nothing in it was changed)")
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(marker, json.dumps({**settings, "files": sorted(set(files) | previous)}, indent=1) + "\n")
    for relative, text in files.items():
        path = out_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, text)
    for relative in sorted(previous - set(files)):
        stale = out_dir / relative
        if stale.is_file() and not stale.is_symlink():
            stale.unlink()
            log.info("removed %s (written by an earlier run, not by this one)", stale)
    _atomic_write(marker, json.dumps({**settings, "files": sorted(files)}, indent=1) + "\n")


def _previous_files(out_dir: Path, marker: Path) -> set[str] | None:
    """The files an earlier run wrote (empty for a new or empty folder); None if the folder is not ours."""
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return set()
    if not marker.is_file():
        return None
    try:
        listed = json.loads(marker.read_text(encoding="utf-8")).get("files", [])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise BrainforgeError(f"{marker}: unreadable marker ({exc}); delete it only if this folder holds nothing "
                              "but an earlier `brainforge qa` output, or give a new folder") from None
    # Only plain relative paths inside the folder: a tampered marker must not reach outside it.
    return {item for item in listed if isinstance(item, str) and not Path(item).is_absolute() and ".." not in Path(item).parts}


def _atomic_write(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
