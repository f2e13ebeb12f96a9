"""`brainforge ingest`, `search`, `ask` and `sop ...`: the memory system from the command line.

All of them read the `memory:` section of a config file when `--config` is given (the rest of
the file may be a full training config), else the defaults with the store in
`.brainforge/memory` under the current directory.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import List, Optional

import typer

from brainforge.errors import StoreError

sop_app = typer.Typer(no_args_is_help=True, help="List, show, add and validate SOPs (procedures).")

MemoryConfigOpt = typer.Option(None, "--config", "-c", help="A config.yaml whose `memory:` section to use.")
StoreOpt = typer.Option(None, "--store", help="Store folder (overrides memory.store).")
MemorySetOpt = typer.Option(None, "--set", help="Override a memory key, e.g. --set retrieval.top_k=5 (repeatable).")


def _memory_config(config: Optional[Path], store: Optional[Path], overrides: Optional[List[str]]):
    import transformers

    from brainforge.config import load_memory_config

    transformers.utils.logging.disable_progress_bar()  # the weight-loading bar on every command is noise
    memory = load_memory_config(config, overrides)
    if store is not None:
        memory.store = str(store.resolve())
    return memory


def ingest(
    paths: List[Path] = typer.Argument(..., help="Files or folders to ingest (code, Markdown, text)."),
    config: Optional[Path] = MemoryConfigOpt,
    store: Optional[Path] = StoreOpt,
    overrides: Optional[List[str]] = MemorySetOpt,
    rebuild: bool = typer.Option(False, "--rebuild", help="Build the store again from scratch, beside the old one, and swap "
                                 "it in when complete (refused if the folder is not a brainforge store)."),
    follow_symlinks: bool = typer.Option(False, "--follow-symlinks", help="Follow symlinks that lead out of the given "
                                         "folders (by default they are skipped and listed)."),
) -> None:
    """Chunk, embed and index documents and code into the memory store (incremental)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from brainforge.memory.store import MemoryStore

    memory = _memory_config(config, store, overrides)
    memory_store = MemoryStore(memory)
    with Progress(TextColumn("[bold]ingest"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), transient=True) as progress:
        task = progress.add_task("", total=None)

        def on_progress(done: int, total: int, current: str) -> None:
            progress.update(task, completed=done, total=total, description=current[-60:])

        report = memory_store.ingest([str(p) for p in paths], rebuild=rebuild, on_progress=on_progress,
                                     follow_symlinks=follow_symlinks)
    typer.echo(f"store: {memory.store}")
    if rebuild:
        typer.echo(f"embedder: {memory_store.embedder.model_id} (--rebuild embeds with the configured embedder; "
                   "an embedder `brainforge memory tune` saved in the store is dropped)")
    typer.echo(f"files: {report.files_found} found, {report.files_ingested} ingested, {report.files_unchanged} unchanged, "
               f"{report.files_removed} removed, {len(report.skipped)} skipped")
    typer.echo(f"chunks: {report.chunks_added} added, {report.chunks_removed} removed, {report.chunks_total} in store "
               f"({report.seconds:.1f} s, {report.chunks_per_second:.1f} chunks/s embedded)")
    if report.chunks_restored:
        typer.echo(f"restored: {report.chunks_restored} committed chunks had no vectors in the index (deleted or damaged) "
                   "and were embedded again")
    if report.line_chunked:
        kinds = ", ".join(f"{ext} x{n}" for ext, n in sorted(report.line_chunked.items()))
        typer.echo(f"no parser for: {kinds} (chunked by lines)")
    if report.replaced_characters:
        typer.echo(f"not UTF-8 (undecodable bytes replaced): {', '.join(report.replaced_characters[:5])}"
                   + (" ..." if len(report.replaced_characters) > 5 else ""))
    for path, reason in report.skipped[:20]:
        typer.echo(f"skipped {path}: {reason}")
    if len(report.skipped) > 20:
        typer.echo(f"... and {len(report.skipped) - 20} more skipped")


def search(
    query: str = typer.Argument(..., help="What to look for."),
    config: Optional[Path] = MemoryConfigOpt,
    store: Optional[Path] = StoreOpt,
    overrides: Optional[List[str]] = MemorySetOpt,
    top_k: Optional[int] = typer.Option(None, "--top-k", "-k", help="Results to show (default memory.retrieval.top_k)."),
    show_text: bool = typer.Option(True, "--text/--no-text", help="Print each chunk's text."),
) -> None:
    """Hybrid search (vector + BM25, fused, reranked) with each stage's rank and score."""
    from brainforge.memory.retrieval import HybridRetriever
    from brainforge.memory.store import MemoryStore

    memory = _memory_config(config, store, overrides)
    memory_store = MemoryStore(memory)
    memory_store.require_existing()
    retriever = HybridRetriever(memory_store, memory.retrieval)
    result = retriever.search(query, top_k=top_k)
    timing = ", ".join(f"{stage} {ms:.0f} ms" for stage, ms in result.milliseconds.items())
    typer.echo(f"stages: {' -> '.join(result.stages)}  ({result.candidates} candidates; {timing})")
    if result.signals:
        typer.echo(f"looks like code ({'; '.join(result.signals)}): BM25 weight {result.weights['bm25']:g}")
    for number, hit in enumerate(result.hits, start=1):
        stages = "  ".join(f"{stage} #{hit.ranks[stage]} ({hit.scores[stage]:.3f})" if stage in hit.ranks else f"{stage} -"
                           for stage in result.stages if stage != "rerank:none")
        typer.echo(f"\n[{number}] {hit.chunk.location}  {hit.chunk.kind} {hit.chunk.name}".rstrip())
        typer.echo(f"    {stages}")
        if show_text:
            body = hit.chunk.text.partition("\n")[2]
            typer.echo("    " + "\n    ".join(body.splitlines()[:12]) + ("\n    ..." if body.count("\n") >= 12 else ""))


def ask(
    question: str = typer.Argument(..., help="Your question."),
    config: Optional[Path] = MemoryConfigOpt,
    store: Optional[Path] = StoreOpt,
    overrides: Optional[List[str]] = MemorySetOpt,
    adapter: Optional[Path] = typer.Option(None, "--adapter", "-a", help="A run folder or adapter folder."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Base model (default: the adapter's base, or 'default')."),
    max_new_tokens: int = typer.Option(256, help="Answer length limit."),
    show_prompt: bool = typer.Option(False, "--show-prompt", help="Print the full system prompt given to the model."),
) -> None:
    """Answer a question from memory: routed, retrieved, with an SOP when one fits, cited.

    With `--adapter` of a search policy (a search_r1 run, or a `brainforge reason` run),
    the policy answers as it was trained: it searches the store itself (its run's
    memory.store, or --store), greedily, and the searches and the final answer are shown."""
    from brainforge.inference import load_chat_model
    from brainforge.memory.assistant import MemoryAssistant
    from brainforge.memory.store import MemoryStore

    if adapter is not None:
        from brainforge.reasoning.policy import search_run_config

        search_config = search_run_config(adapter)
        if search_config is not None:
            _ask_with_search(question, adapter, search_config, model, store)
            return
    memory = _memory_config(config, store, overrides)
    memory_store = MemoryStore(memory)
    memory_store.require_existing()  # before loading any model
    assistant = MemoryAssistant(memory, memory_store)
    messages, context = assistant.messages(question)
    chat_model = load_chat_model(adapter, model)
    answer = chat_model.generate([messages], max_new_tokens=max_new_tokens)[0]
    if show_prompt:
        typer.echo(f"--- system prompt ---\n{context.system_prompt}\n---------------------")
    typer.echo(answer)
    typer.echo("\nrouting:\n  " + context.decision.explain().replace("\n", "\n  "))
    if context.hits:
        typer.echo("sources:")
        for number, hit in enumerate(context.hits, start=1):
            typer.echo(f"  [{number}] {hit.chunk.location}  ({' -> '.join(context.search.stages)}; score {hit.score:.3f})")
    else:
        typer.echo("sources: none (retrieval not needed)")
    typer.echo(f"SOP: {context.sop.sop.name} ({context.sop.explain()})" if context.sop else "SOP: none")


def _ask_with_search(question: str, adapter: Path, config, model: Optional[str], store: Optional[Path]) -> None:
    """A search policy answers: its searches, the final answer, and how many searches it made."""
    import transformers

    from brainforge.reasoning.policy import load_search_policy

    transformers.utils.logging.disable_progress_bar()  # as for every memory command
    policy = load_search_policy(adapter, config, model, store)
    (result,) = policy.ask([question])
    for number, query in enumerate(result.searches, start=1):
        typer.echo(f"search {number}: {query}")
    typer.echo(f"\nanswer: {result.answer if result.answer is not None else '(no <answer> given)'}")
    typer.echo(f"searches: {len(result.searches)} (store {policy.config.memory.store}; rollout ended: {result.log.ended})")
    typer.echo(f"\n--- transcript ---\n{result.transcript.strip()}")


# ------------------------------------------------------------------------------ sop


def _sop_manager(config: Optional[Path], overrides: Optional[List[str]], embed: bool = False):
    from brainforge.memory.sop import SOPManager

    memory = _memory_config(config, None, overrides)
    embedder = None
    if embed:
        from brainforge.memory.embedder import Embedder

        embedder = Embedder(memory.embedder)
    return SOPManager.from_paths(memory.sops, builtin=memory.builtin_sops,
                                 embed=embedder.embed_queries if embedder else None), memory


@sop_app.command("list")
def sop_list(config: Optional[Path] = MemoryConfigOpt, overrides: Optional[List[str]] = MemorySetOpt) -> None:
    """Every SOP available (bundled and from memory.sops)."""
    manager, _ = _sop_manager(config, overrides)
    for sop in manager.sops:
        typer.echo(f"{sop.name:28s} {len(sop.steps)} steps  {sop.description}")


@sop_app.command("show")
def sop_show(name: str = typer.Argument(..., help="SOP name."), config: Optional[Path] = MemoryConfigOpt,
             overrides: Optional[List[str]] = MemorySetOpt) -> None:
    """An SOP's triggers and its steps as the model sees them."""
    manager, _ = _sop_manager(config, overrides)
    sop = manager.get(name)
    typer.echo(sop.format_steps())
    typer.echo(f"\ntriggers: keywords {sop.triggers.keywords}; patterns {sop.triggers.patterns}; "
               f"examples {sop.triggers.examples}")


@sop_app.command("match")
def sop_match(query: str = typer.Argument(..., help="A request to match."), config: Optional[Path] = MemoryConfigOpt,
              overrides: Optional[List[str]] = MemorySetOpt) -> None:
    """Score every SOP against a request and say which one would be used."""
    manager, memory = _sop_manager(config, overrides, embed=True)
    matches = manager.match(query)
    for match in matches:
        typer.echo(match.explain())
    best = matches[0] if matches and matches[0].score >= memory.router.procedure_threshold else None
    typer.echo(f"selected: {best.sop.name if best else 'none'} (threshold {memory.router.procedure_threshold})")


@sop_app.command("validate")
def sop_validate(files: List[Path] = typer.Argument(..., help="SOP files or folders.")) -> None:
    """Check SOP files; errors name the file and the field."""
    from brainforge.memory.sop import SOPManager, load_sop_file, sop_files

    skipped: list[tuple[Path, str]] = []
    paths = sop_files(files, skipped)
    for path, reason in skipped:
        typer.echo(f"skipped {path}: {reason}")
    if not paths:
        raise StoreError(f"no SOP files (*.yaml, *.yml, *.json) to validate in {', '.join(map(str, files))}")
    sops = [load_sop_file(path) for path in paths]
    SOPManager(sops)  # also checks names are unique
    for sop in sops:
        typer.echo(f"ok: {sop.name} ({len(sop.steps)} steps)")


@sop_app.command("add")
def sop_add(
    name: str = typer.Option(..., help="Unique SOP name, e.g. release-checklist."),
    description: str = typer.Option(..., help="What the procedure is for."),
    step: List[str] = typer.Option(..., "--step", help="A step's action, in order (repeatable)."),
    keyword: Optional[List[str]] = typer.Option(None, "--keyword", help="A trigger keyword (repeatable)."),
    example: Optional[List[str]] = typer.Option(None, "--example", help="An example request (repeatable)."),
    folder: Path = typer.Option(Path("sops"), "--dir", help="Folder to write NAME.yaml into."),
) -> None:
    """Write a new SOP file (edit it afterwards for conditions, tools and fallbacks)."""
    from pydantic import ValidationError

    from brainforge.memory.sop import SOP, write_sop

    try:
        sop = SOP.model_validate({"name": name, "description": description, "steps": [{"action": s} for s in step],
                                  "triggers": {"keywords": keyword or [], "examples": example or []}})
    except ValidationError as exc:
        raise StoreError("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from None
    path = write_sop(sop, folder)
    typer.echo(f"wrote {path}; list it under memory.sops in your config to use it")


# ------------------------------------------------------------------------------ memory


memory_app = typer.Typer(no_args_is_help=True, help="Work on the memory store itself (tune its embedder).")


@memory_app.command("tune")
def memory_tune(
    config: Optional[Path] = MemoryConfigOpt,
    store: Optional[Path] = StoreOpt,
    overrides: Optional[List[str]] = MemorySetOpt,
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Passes over the training pairs (memory.tune.epochs)."),
    max_pairs: Optional[int] = typer.Option(None, "--max-pairs", help="Most pairs used (memory.tune.max_pairs)."),
    held_out: Optional[float] = typer.Option(None, "--held-out", help="Fraction of chunks held out for the before/after "
                                             "figures (memory.tune.held_out)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Split, sample and training seed (memory.tune.seed)."),
) -> None:
    """Fine-tune the embedder on pairs mined from the store (docstring -> code, heading -> section,
    name -> definition), save it in the store, re-embed the store, and compare held-out retrieval
    before and after. The store then uses the tuned embedder while memory.embedder.name_or_path is
    `default`; `brainforge ingest --rebuild` goes back to the configured embedder."""
    from brainforge.memory.tuning import KINDS, load_and_tune

    flags = {"epochs": epochs, "max_pairs": max_pairs, "held_out": held_out, "seed": seed}
    extra = [f"tune.{key}={value}" for key, value in flags.items() if value is not None]
    memory = _memory_config(config, store, list(overrides or []) + extra)
    # Progress and the trainer's loss log go to stderr; stdout is the result alone.
    with contextlib.redirect_stdout(sys.stderr):
        report = load_and_tune(memory, progress=lambda message: typer.echo(message, err=True))
    typer.echo(f"store: {memory.store} ({report.chunks} chunks)")
    typer.echo("pairs mined: " + ", ".join(f"{kind} {report.pairs_by_kind[kind]}" for kind in KINDS if kind in memory.tune.kinds)
               + f" (used {report.pairs_used})")
    typer.echo(f"split by chunk: {report.train_pairs} training, {report.held_out_pairs} held out"
               + (f" ({report.dropped_anchor_overlap} training pairs dropped: their anchor or text is also held out)"
                  if report.dropped_anchor_overlap else ""))
    assert report.before is not None and report.after is not None
    typer.echo(f"\nheld-out retrieval (vector search over all {report.chunks} chunks, {report.held_out_pairs} pairs):")
    typer.echo(f"  {'':8}{'R@1':>8}{'R@10':>8}{'MRR@10':>8}")
    for label, figures in (("before", report.before), ("after", report.after)):
        typer.echo(f"  {label:8}{figures.recall_at_1:8.3f}{figures.recall_at_10:8.3f}{figures.mrr_at_10:8.3f}")
    typer.echo(f"\ntuned embedder: {report.embedder_folder} (from {report.base_embedder}); the store was re-embedded with it "
               "and search/ask/ingest use it while memory.embedder.name_or_path is `default`; "
               "`brainforge ingest --rebuild` goes back to the configured embedder")
    typer.echo(f"seconds: {report.seconds:.1f} (training {report.train_seconds:.1f}, re-embedding {report.reembed_seconds:.1f})")
