"""The ExGRPO experience buffer: the model's own correct trajectories, kept for replay.

ALGORITHMS.md section 4. After each rollout the trainer reports, per question, how many of
its K = num_generations samples were correct (k) and the correct ones themselves, with the
log-probs the *trainer* recomputed at collection time (not the sampler's: replay weighs each
token by w = pi_theta / pi_recorded, so the recorded side must come from the same forward
pass arithmetic as the current side).

* k = K: the question is solved; it is *retired* for good (a retired question carries zero
  advantage when replayed, so replaying it only wastes compute). Later records are ignored.
* lbound < k <= rbound: the question sits in bucket k (its latest k; exactly one bucket) and
  its correct trajectories are stored, deduplicated by token ids, at most
  `max_trajectories_per_question` (the newest win; a re-sampled duplicate counts as new).
* otherwise nothing is stored (nothing correct to replay); a stored question keeps its bucket.

So every stored question has at least one trajectory and every stored question is eligible.
Sampling picks buckets by weight (`normal`: a Gaussian at K/2 with sigma 1, favouring
medium difficulty), bucket counts come from ONE multinomial draw, a bucket asked for more
questions than it holds passes the excess on to the other non-empty buckets, and questions
within a bucket are drawn without replacement. Everything is deterministic given the
`torch.Generator` and the buffer's (insertion-ordered) state.

The state is plain Python (lists, dicts, str, int, float, bool, None) because Lightning
restores checkpoints with `torch.load`, whose default is `weights_only=True` on torch >= 2.6:
any other object in the checkpoint would make `--resume` fail.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from brainforge.config import ExperienceSettings
from brainforge.data.prompts import PromptExample
from brainforge.errors import BrainforgeError, ConfigError

log = logging.getLogger(__name__)

STATE_VERSION = 1
_ABSENT = "<absent>"


@dataclass
class Experience:
    """One stored correct completion, exactly as sampled (end-of-turn token included)."""

    token_ids: list[int]
    logprobs: list[float]
    """Trainer-recomputed log-probs at collection time, one per token."""
    text: str

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(f"Experience has {len(self.token_ids)} token ids but {len(self.logprobs)} log-probs")
        if not self.token_ids:
            raise ValueError("Experience has no tokens")


@dataclass
class _Entry:
    prompt: Any
    bucket: int
    trajectories: list[Experience] = field(default_factory=list)  # oldest first


def question_uid(messages: list[dict[str, str]]) -> str:
    """Stable id of a prompt: the same messages give the same uid in every run and process."""
    text = json.dumps(messages, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def select_lowest_entropy(trajectories: list[Experience], mean_entropies: list[float]) -> int:
    """Index of the trajectory with the lowest mean entropy (first on ties).

    The entropies must come from the *current* policy (a stale entropy picks by an old
    model's confidence). A NaN entropy never wins unless all are NaN (then index 0).
    """
    if len(trajectories) != len(mean_entropies):
        raise ValueError(f"{len(trajectories)} trajectories but {len(mean_entropies)} entropies")
    if not trajectories:
        raise ValueError("select_lowest_entropy needs at least one trajectory")
    best, best_value = 0, math.inf
    for index, value in enumerate(mean_entropies):
        if not math.isnan(value) and value < best_value:
            best, best_value = index, value
    return best


class ExperienceBuffer:
    """Buckets of replayable questions by success count, with retirement and persistence.

    Args:
        settings: `algorithm.experience`.
        group_size: K = `algorithm.grpo.num_generations`; k is counted out of K, and the
            sampling Gaussian is centred at K/2 (the same K, or the buckets mean nothing).
        signature: the settings that must be equal to resume this buffer (the trainer
            chooses them: model, task, reward...); compared key by key on load.
    """

    def __init__(self, settings: ExperienceSettings, group_size: int, signature: dict[str, Any]):
        if group_size < 2:
            raise ConfigError(f"algorithm.grpo.num_generations: must be >= 2 for the experience buffer (got {group_size})")
        rbound = group_size - 1 if settings.rbound is None else settings.rbound
        if rbound >= group_size:
            raise ConfigError(
                f"algorithm.experience.rbound: {rbound} must be below num_generations ({group_size}); "
                f"k = {group_size} retires a question. Set rbound <= {group_size - 1} or leave it unset"
            )
        if settings.lbound >= rbound:
            raise ConfigError(
                f"algorithm.experience.lbound: {settings.lbound} leaves no bucket below rbound {rbound}, so nothing "
                f"would ever be replayed; set lbound < rbound (default lbound 0)"
            )
        self.settings = settings
        self.group_size = group_size
        self.lbound = settings.lbound
        self.rbound = rbound
        self.signature = dict(signature)
        self._active = False
        self._entries: dict[str, _Entry] = {}
        self._buckets: dict[int, dict[str, None]] = {k: {} for k in self._bucket_keys()}  # ordered sets
        self._retired: dict[str, None] = {}

    def _bucket_keys(self) -> range:
        return range(self.lbound + 1, self.rbound + 1)

    # ------------------------------------------------------------------ collection

    def record_group(self, uid: str, prompt: Any, successes: int, correct: list[Experience]) -> None:
        """Update the buffer with one question's latest rollout: k = `successes` of K.

        ALGORITHMS.md section 4 collects only once replay is active; calling this or not
        before then is the trainer's choice.
        """
        if not 0 <= successes <= self.group_size:
            raise ValueError(f"successes must be in 0..{self.group_size}, got {successes}")
        if len(correct) > successes:
            raise ValueError(f"{len(correct)} correct trajectories for {successes} successes")
        if uid in self._retired:
            return
        if successes == self.group_size:
            self._retire(uid)
            return
        if not self.lbound < successes <= self.rbound:
            return
        entry = self._entries.get(uid)
        if entry is None:
            if not correct:
                return  # nothing to replay: not eligible, so not stored
            entry = self._entries[uid] = _Entry(prompt=prompt, bucket=successes)
        else:
            del self._buckets[entry.bucket][uid]
            entry.bucket = successes
            entry.prompt = prompt
        self._buckets[successes][uid] = None
        self._add_trajectories(entry, correct)

    def _retire(self, uid: str) -> None:
        entry = self._entries.pop(uid, None)
        if entry is not None:
            del self._buckets[entry.bucket][uid]
        self._retired[uid] = None

    def _add_trajectories(self, entry: _Entry, new: list[Experience]) -> None:
        for experience in new:
            key = tuple(experience.token_ids)
            # A duplicate is refreshed: it moves to the newest slot with the latest log-probs.
            entry.trajectories = [old for old in entry.trajectories if tuple(old.token_ids) != key]
            entry.trajectories.append(experience)
        del entry.trajectories[: -self.settings.max_trajectories_per_question]

    # ------------------------------------------------------------------ activation

    def observe_solve_rate(self, rate: float) -> None:
        """Switch replay on after the first step whose share of correct samples exceeds
        `start_solve_rate` (strictly); it then stays on."""
        if not self._active and rate > self.settings.start_solve_rate:
            self._active = True
            log.info("experience replay active: solve rate %.3f > %.3f", rate, self.settings.start_solve_rate)

    @property
    def active(self) -> bool:
        return self._active

    # ------------------------------------------------------------------ sampling

    def eligible(self) -> list[str]:
        """Replayable questions (stored, not retired, >= 1 trajectory), in insertion order."""
        return [uid for uid, entry in self._entries.items() if entry.trajectories]

    def replay_count(self, batch_prompts: int) -> int:
        """How many of a step's `batch_prompts` prompts are replayed questions."""
        if not self._active:
            return 0
        # The epsilon keeps 0.29 * 100 = 28.999999999999996 from flooring to 28.
        wanted = math.floor(self.settings.experience_ratio * batch_prompts + 1e-9)
        return min(len(self.eligible()), wanted)

    def _pools(self) -> dict[int, list[str]]:
        pools = {k: [uid for uid in bucket if self._entries[uid].trajectories] for k, bucket in self._buckets.items()}
        return {k: uids for k, uids in pools.items() if uids}

    def _log_weight(self, k: int) -> float:
        mode = self.settings.bucket_weighting
        if mode == "normal":
            # Gaussian density at k, mu = K/2, sigma = 1 (the 1/sqrt(2 pi) cancels on normalising).
            return -0.5 * (k - self.group_size / 2) ** 2
        if mode == "linear":
            return math.log(k / self.group_size)
        if mode == "sqrt":
            return 0.5 * math.log(k / self.group_size)
        if mode == "uniform":
            return 0.0
        raise ValueError(f"unknown bucket_weighting {mode!r}")

    def _probabilities(self, ks: list[int]) -> list[float]:
        # Normalised in log space: with large K the far buckets' Gaussian densities
        # underflow to 0, and all-zero weights would make the draw fail.
        logs = [self._log_weight(k) for k in ks]
        top = max(logs)
        weights = [math.exp(value - top) for value in logs]
        total = sum(weights)
        return [w / total for w in weights]

    def bucket_probabilities(self) -> dict[int, float]:
        """Probability of each non-empty bucket being drawn; sums to 1 (empty dict if none)."""
        ks = sorted(self._pools())
        return dict(zip(ks, self._probabilities(ks))) if ks else {}

    def sample_questions(self, n: int, generator: torch.Generator) -> list[str]:
        """`n` distinct eligible uids, bucket by bucket (ascending k); the caller shuffles."""
        pools = self._pools()
        available = sum(len(uids) for uids in pools.values())
        if not 0 <= n <= available:
            raise ValueError(f"cannot sample {n} questions from {available} eligible ones")
        if n == 0:
            return []
        ks = sorted(pools)
        capacity = [len(pools[k]) for k in ks]
        probs = self._probabilities(ks)
        counts = self._draw(probs, n, generator)
        # Overflow: a bucket asked for more than it holds passes the excess on, by weight, to
        # the buckets with room left. Each round places >= 1 item, since total capacity >= n.
        excess = sum(max(0, c - cap) for c, cap in zip(counts, capacity))
        counts = [min(c, cap) for c, cap in zip(counts, capacity)]
        while excess:
            room = [p if c < cap else 0.0 for p, c, cap in zip(probs, counts, capacity)]
            if sum(room) <= 0:  # only zero-weight buckets have room left
                room = [1.0 if c < cap else 0.0 for c, cap in zip(counts, capacity)]
            extra = self._draw(room, excess, generator)
            placed = [min(c + e, cap) for c, e, cap in zip(counts, extra, capacity)]
            excess -= sum(placed) - sum(counts)
            counts = placed
        chosen: list[str] = []
        for k, count in zip(ks, counts):
            if count:
                order = torch.randperm(len(pools[k]), generator=generator)[:count].tolist()
                chosen.extend(pools[k][i] for i in order)
        return chosen

    @staticmethod
    def _draw(weights: list[float], n: int, generator: torch.Generator) -> list[int]:
        """Counts per category of one multinomial draw of n (with replacement)."""
        picks = torch.multinomial(torch.tensor(weights, dtype=torch.float64), n, replacement=True, generator=generator)
        return torch.bincount(picks, minlength=len(weights)).tolist()

    # ------------------------------------------------------------------ access

    def trajectories(self, uid: str) -> list[Experience]:
        """The stored correct trajectories of `uid`, oldest first."""
        return list(self._require(uid).trajectories)

    def prompt(self, uid: str) -> Any:
        return self._require(uid).prompt

    def bucket_of(self, uid: str) -> int | None:
        """The bucket (latest k) of a stored question, None if it is not stored."""
        entry = self._entries.get(uid)
        return None if entry is None else entry.bucket

    def is_retired(self, uid: str) -> bool:
        return uid in self._retired

    def _require(self, uid: str) -> _Entry:
        entry = self._entries.get(uid)
        if entry is None:
            state = "retired" if uid in self._retired else "not in the buffer"
            raise KeyError(f"question {uid} is {state}")
        return entry

    def stats(self) -> dict[str, float]:
        """Numbers to log each step (the trainer adds the replay share)."""
        stats = {
            "experience/size": float(sum(len(e.trajectories) for e in self._entries.values())),
            "experience/questions": float(len(self._entries)),
            "experience/retired": float(len(self._retired)),
            "experience/active": float(self._active),
        }
        for k, bucket in self._buckets.items():
            stats[f"experience/bucket_{k}"] = float(len(bucket))
        return stats

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state, loadable by `torch.load(..., weights_only=True)`."""
        return {
            "version": STATE_VERSION,
            "signature": _plain(self.signature, "signature"),
            "layout": self._layout(),
            "active": self._active,
            "retired": list(self._retired),
            "buckets": {k: list(bucket) for k, bucket in self._buckets.items()},
            "entries": [
                {
                    "uid": uid,
                    "prompt": _plain_prompt(entry.prompt, uid),
                    "trajectories": [
                        {"token_ids": [int(t) for t in e.token_ids], "logprobs": [float(p) for p in e.logprobs], "text": e.text}
                        for e in entry.trajectories
                    ],
                }
                for uid, entry in self._entries.items()
            ],
        }

    def _layout(self) -> dict[str, int]:
        """What the buckets mean, keyed by the config keys a user would change."""
        return {
            "algorithm.grpo.num_generations": self.group_size,
            "algorithm.experience.lbound": self.lbound,
            "algorithm.experience.rbound": self.rbound,
        }

    def load_state_dict(self, state: dict[str, Any], prompt_factory: Callable[[Any], Any] | None = None) -> None:
        """Restore a `state_dict()`; all or nothing (a rejected state leaves the buffer as it was).

        Args:
            state: from `state_dict()`, possibly through torch.save/torch.load.
            prompt_factory: rebuilds a stored prompt from its plain form ({"messages",
                "columns"} for a PromptExample, the plain value otherwise). Default:
                PromptExample for PromptExamples, the plain value for anything else.
        Raises:
            ConfigError: the buffer was written under different settings (each named).
            BrainforgeError: the state is damaged or from another version.
        """
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            version = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise BrainforgeError(
                f"the checkpoint's experience buffer has format version {version!r}, this brainforge reads "
                f"{STATE_VERSION}; start a new run (another training.run_name) instead of --resume"
            )
        differences = _differences(state.get("signature", {}), self.signature) + _differences(state.get("layout", {}), self._layout())
        if differences:
            raise ConfigError(
                "--resume: the checkpoint's experience buffer was written under a different config ("
                + "; ".join(differences)
                + "); restore those settings to resume, or start a new run (another training.run_name)"
            )
        entries, buckets, retired = self._parse(state, prompt_factory)
        self._entries, self._buckets, self._retired = entries, buckets, retired
        self._active = bool(state.get("active", False))

    def _parse(self, state: dict[str, Any], prompt_factory: Callable[[Any], Any] | None) -> tuple[dict[str, _Entry], dict[int, dict[str, None]], dict[str, None]]:
        def damaged(problem: str) -> BrainforgeError:
            return BrainforgeError(
                f"the checkpoint's experience buffer is damaged ({problem}); resume from an earlier checkpoint "
                f"or start a new run (another training.run_name)"
            )

        try:
            raw_entries = list(state["entries"])
            raw_buckets = dict(state["buckets"])
            retired = dict.fromkeys(str(uid) for uid in state["retired"])
        except (KeyError, TypeError) as exc:
            raise damaged(f"missing or malformed field {exc}") from None
        entries: dict[str, _Entry] = {}
        for position, raw in enumerate(raw_entries):
            if not isinstance(raw, dict) or not isinstance(raw.get("uid"), str):
                raise damaged(f"entry {position} has no uid")
            uid = raw["uid"]
            try:
                trajectories = [Experience(list(t["token_ids"]), list(t["logprobs"]), str(t["text"])) for t in raw["trajectories"]]
                stored_prompt = raw["prompt"]
            except (KeyError, TypeError, ValueError) as exc:
                raise damaged(f"question {uid}: {exc}") from None
            if not trajectories:
                raise damaged(f"question {uid} has no trajectory")
            if uid in entries or uid in retired:
                raise damaged(f"question {uid} is stored twice or both stored and retired")
            keep = self.settings.max_trajectories_per_question  # may have been lowered since
            entries[uid] = _Entry(prompt=_rebuild_prompt(stored_prompt, prompt_factory), bucket=-1, trajectories=trajectories[-keep:])
        buckets: dict[int, dict[str, None]] = {k: {} for k in self._bucket_keys()}
        for raw_k, uids in raw_buckets.items():
            k = int(raw_k) if isinstance(raw_k, (int, str)) and str(raw_k).lstrip("-").isdigit() else raw_k
            if k not in buckets:
                raise damaged(f"bucket {k!r} is outside {self.lbound + 1}..{self.rbound}")
            for uid in uids:
                if uid not in entries or entries[uid].bucket != -1:
                    raise damaged(f"bucket {k} lists question {uid}, which is unknown or already in a bucket")
                entries[uid].bucket = k
                buckets[k][uid] = None
        unplaced = [uid for uid, entry in entries.items() if entry.bucket == -1]
        if unplaced:
            raise damaged(f"question {unplaced[0]} is in no bucket")
        return entries, buckets, retired


# ---------------------------------------------------------------------- plain data

_warned_types: set[str] = set()


def _plain(value: Any, where: str) -> Any:
    """`value` as types `torch.load(weights_only=True)` accepts.

    Containers are rebuilt; numpy values become Python numbers/lists; anything else
    (a datetime, a custom object) is stored as its str(), with one warning per type,
    so a resumed replay sees the text rather than a checkpoint that cannot be loaded.
    """
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {_plain(key, where): _plain(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, (set, frozenset)):
        return [_plain(item, where) for item in sorted(value, key=repr)]
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return _plain(value.tolist(), where)
    name = type(value).__qualname__
    if name not in _warned_types:
        _warned_types.add(name)
        log.warning("experience buffer: %s is a %s, which a checkpoint cannot hold; it is saved as text", where, name)
    return str(value)


def _plain_prompt(prompt: Any, uid: str) -> dict[str, Any]:
    if isinstance(prompt, PromptExample):
        return {"kind": "prompt_example", "value": {"messages": _plain(prompt.messages, f"question {uid} messages"), "columns": _plain(prompt.columns, f"question {uid} column")}}
    return {"kind": "plain", "value": _plain(prompt, f"question {uid} prompt")}


def _rebuild_prompt(stored: Any, prompt_factory: Callable[[Any], Any] | None) -> Any:
    if not isinstance(stored, dict) or "kind" not in stored or "value" not in stored:
        raise BrainforgeError(
            "the checkpoint's experience buffer is damaged (a stored prompt has no kind/value); resume from an "
            "earlier checkpoint or start a new run (another training.run_name)"
        )
    value = stored["value"]
    if prompt_factory is not None:
        return prompt_factory(value)
    if stored["kind"] == "prompt_example":
        return PromptExample(messages=value["messages"], columns=value["columns"])
    return value


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'key: old -> new' for every key whose value differs (missing keys shown as <absent>)."""
    lines = []
    for key in sorted(set(old) | set(new), key=str):
        before, after = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if _plain(before, "signature") != _plain(after, "signature"):
            lines.append(f"{key}: {before!r} -> {after!r}")
    return lines
