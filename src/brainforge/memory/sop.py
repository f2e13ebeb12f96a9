"""Procedural memory: standard operating procedures (SOPs) and how a query picks one.

An SOP is a JSON or YAML file: a name, a description, triggers (keywords, regular expression
patterns, example queries) and ordered steps (action, condition, expected output, tools,
fallback). A query is matched two ways and the score says how:

- lexical: a pattern match scores 1; otherwise each keyword found (whole words, any case)
  adds 0.5, capped at 1;
- semantic: the best cosine similarity between the query and the SOP's example queries and
  description, with the same bi-encoder that embeds the documents.

`score = 0.4 * lexical + 0.6 * semantic`; the best SOP is used when its score reaches
`memory.router.procedure_threshold`.
"""

from __future__ import annotations

import json
import logging
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import regex
import yaml
from pydantic import Field, ValidationError, field_validator

from brainforge.config import StrictModel
from brainforge.errors import StoreError
from brainforge.safe_yaml import safe_load

log = logging.getLogger(__name__)

LEXICAL_WEIGHT = 0.4
SEMANTIC_WEIGHT = 0.6
SOP_SUFFIXES = (".yaml", ".yml", ".json")
PATTERN_TIMEOUT_S = 0.1
"""Time budget of one trigger pattern against one query. Patterns run on the `regex` engine
with a timeout: a pattern with nested quantifiers such as `(a+)+$` backtracks exponentially
on a long non-matching input (minutes with `re`), and queries come from users."""


class SOPTriggers(StrictModel):
    keywords: list[str] = Field(default_factory=list)
    """Words or phrases that suggest this procedure (matched as whole words, any case)."""
    patterns: list[str] = Field(default_factory=list)
    """Regular expressions; any match makes the lexical score 1."""
    examples: list[str] = Field(default_factory=list)
    """Example requests this procedure answers; compared by embedding similarity."""

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                regex.compile(pattern)
            except regex.error as exc:
                raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {exc}") from None
        return patterns


class SOPStep(StrictModel):
    action: str = Field(min_length=1)
    """What to do."""
    condition: str | None = None
    """Only when this holds."""
    expected_output: str | None = None
    """What doing it should produce; how to know the step worked."""
    tools: list[str] = Field(default_factory=list)
    """Tools the step uses."""
    fallback: str | None = None
    """What to do when the step fails or does not apply."""


class SOP(StrictModel):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Unique id, e.g. `debugging-code`."""
    description: str = Field(min_length=1)
    triggers: SOPTriggers = Field(default_factory=SOPTriggers)
    steps: list[SOPStep] = Field(min_length=1)

    def format_steps(self) -> str:
        """The procedure as the model reads it in the prompt."""
        lines = [f"Procedure: {self.name} - {self.description}"]
        for number, step in enumerate(self.steps, start=1):
            line = f"{number}. {step.action}"
            if step.condition:
                line += f" (only if: {step.condition})"
            lines.append(line)
            if step.expected_output:
                lines.append(f"   Expected: {step.expected_output}")
            if step.tools:
                lines.append(f"   Tools: {', '.join(step.tools)}")
            if step.fallback:
                lines.append(f"   If it fails: {step.fallback}")
        return "\n".join(lines)


@dataclass
class SOPMatch:
    sop: SOP
    score: float
    lexical: float
    semantic: float
    reasons: list[str]

    def explain(self) -> str:
        why = "; ".join(self.reasons) or "no trigger matched"
        return (f"{self.sop.name}: score {self.score:.2f} = {LEXICAL_WEIGHT} x lexical {self.lexical:.2f} "
                f"+ {SEMANTIC_WEIGHT} x semantic {self.semantic:.2f} ({why})")


def load_sop_file(path: Path) -> SOP:
    """One SOP; errors name the file and the field."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise StoreError(f"{path}: cannot read SOP file: {exc}") from None
    try:
        raw = json.loads(text) if path.suffix == ".json" else safe_load(text)
    except json.JSONDecodeError as exc:
        raise StoreError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise StoreError(f"{path}{where}: invalid YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise StoreError(f"{path}: an SOP file must hold one mapping with name, description, triggers and steps")
    try:
        return SOP.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "(top level)"
            message = "unknown field" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
            problems.append(f"{path}: {field}: {message}")
        raise StoreError("\n".join(problems)) from None


def builtin_sop_dir() -> Path:
    return Path(str(resources.files("brainforge.memory") / "sops"))


def sop_files(paths: Sequence[str | Path], skipped: list[tuple[Path, str]] | None = None) -> list[Path]:
    """The SOP files named by `paths` (files, or folders of *.yaml/*.yml/*.json).

    Only regular files are read: a FIFO or device named `x.yaml` in a folder would block
    the read forever, so it is skipped with the reason (appended to `skipped`, and logged).
    Named explicitly, such a path is an error."""
    files: list[Path] = []
    for entry in map(Path, paths):
        if entry.is_dir():
            for path in sorted(p for p in entry.iterdir() if p.suffix in SOP_SUFFIXES):
                reason = _not_regular(path)
                if reason is None:
                    files.append(path)
                    continue
                log.warning("skipped %s: %s", path, reason)
                if skipped is not None:
                    skipped.append((path, reason))
        elif entry.exists():
            reason = _not_regular(entry)
            if reason is not None:
                raise StoreError(f"{entry}: {reason}; give an SOP file (JSON/YAML) or a folder of them")
            files.append(entry)
        else:
            raise StoreError(f"{entry}: no such SOP file or folder (memory.sops)")
    return files


def _not_regular(path: Path) -> str | None:
    """Why `path` cannot be read as an SOP file, or None when it is a regular file."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return None
    kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device" if (
        stat.S_ISCHR(mode) or stat.S_ISBLK(mode)) else "a folder" if stat.S_ISDIR(mode) else "not a regular file"
    return f"{kind}, not a regular file"


class SOPManager:
    """Loads SOPs, matches queries against their triggers, picks the best one."""

    def __init__(self, sops: Sequence[SOP], embed: Any = None) -> None:
        names = [s.name for s in sops]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise StoreError(f"SOP names must be unique; defined more than once: {', '.join(duplicates)}")
        self.sops = list(sops)
        self._embed = embed  # Callable[[list[str]], np.ndarray] of unit vectors, or None (lexical only)
        self._trigger_vectors: list[np.ndarray] | None = None

    @classmethod
    def from_paths(cls, paths: Sequence[str | Path], builtin: bool = True, embed: Any = None) -> "SOPManager":
        files = (sop_files([builtin_sop_dir()]) if builtin else []) + sop_files(paths)
        return cls([load_sop_file(f) for f in files], embed)

    def get(self, name: str) -> SOP:
        for sop in self.sops:
            if sop.name == name:
                return sop
        raise StoreError(f"no SOP named {name!r}; known: {', '.join(s.name for s in self.sops) or 'none'}")

    def match(self, query: str, query_vector: np.ndarray | None = None) -> list[SOPMatch]:
        """Every SOP scored against the query, best first (ties by name)."""
        semantic_scores = self._semantic(query, query_vector)
        matches = []
        for sop, semantic in zip(self.sops, semantic_scores):
            lexical, reasons = _lexical(query, sop.triggers)
            if semantic > 0:
                reasons.append(f"closest example similarity {semantic:.2f}")
            score = LEXICAL_WEIGHT * lexical + SEMANTIC_WEIGHT * semantic
            matches.append(SOPMatch(sop, score, lexical, semantic, reasons))
        return sorted(matches, key=lambda m: (-m.score, m.sop.name))

    def best(self, query: str, threshold: float, query_vector: np.ndarray | None = None) -> SOPMatch | None:
        matches = self.match(query, query_vector)
        return matches[0] if matches and matches[0].score >= threshold else None

    def _semantic(self, query: str, query_vector: np.ndarray | None) -> list[float]:
        if self._embed is None or not self.sops:
            return [0.0] * len(self.sops)
        if self._trigger_vectors is None:
            self._trigger_vectors = [self._embed(s.triggers.examples + [s.description]) for s in self.sops]
        vector = query_vector if query_vector is not None else self._embed([query])[0]
        return [max(0.0, float(np.max(vectors @ vector))) for vectors in self._trigger_vectors]


def _lexical(query: str, triggers: SOPTriggers) -> tuple[float, list[str]]:
    timed_out: list[str] = []
    for pattern in triggers.patterns:
        try:
            found = regex.search(pattern, query, timeout=PATTERN_TIMEOUT_S)
        except TimeoutError:
            log.warning("SOP pattern %r gave up after %.1f s on a %d-character query; rewrite it without nested "
                        "quantifiers such as (a+)+", pattern, PATTERN_TIMEOUT_S, len(query))
            timed_out.append(f"pattern {pattern!r} timed out (counted as no match)")
            continue
        if found:
            return 1.0, [f"pattern {pattern!r} matched"]
    found = [k for k in triggers.keywords if re.search(rf"(?<!\w){re.escape(k)}(?!\w)", query, re.IGNORECASE)]
    if not found:
        return 0.0, timed_out
    return min(1.0, 0.5 * len(found)), [*timed_out, f"keywords {', '.join(found)}"]


def write_sop(sop: SOP, folder: Path) -> Path:
    """Save an SOP as YAML under `folder` (the `sop add` command)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{sop.name}.yaml"
    if path.exists():
        raise StoreError(f"{path} already exists; choose another name or edit the file")
    path.write_text(yaml.safe_dump(sop.model_dump(exclude_none=True), sort_keys=False))
    return path
