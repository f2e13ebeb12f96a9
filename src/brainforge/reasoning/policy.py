"""A trained search policy, loaded from its run folder and answering as it was trained.

`ask --adapter RUN`, `eval` and the pipeline share this: which run folders hold a search
policy (a search_r1 run, or a `brainforge reason` run whose phase 2 is one), the prompt it
was trained on (the search instruction around the bare question), and greedy multi-turn
rollouts against the store its config names.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from brainforge.config import BrainforgeConfig, SearchSettings
from brainforge.errors import ConfigError
from brainforge.reasoning.rollout import SearchFunction, SearchLog, search_messages, tags_of
from brainforge.reasoning.tags import last_answer

log = logging.getLogger(__name__)


def run_folder(path: str | Path) -> Path:
    """The training run folder behind `--adapter PATH`: a reason run's phase 2, a run
    folder, or (for an adapter folder) the run folder around it."""
    path = Path(path)
    if (path / "reason.json").is_file():
        return path / "phase2"
    if path.name == "adapter" and (path.parent / "config.yaml").is_file():
        return path.parent
    return path


def search_run_config(adapter: str | Path) -> BrainforgeConfig | None:
    """The run's config when `adapter` holds a search policy (algorithm search_r1), else
    None (a run folder without config.yaml, an adapter folder alone, another algorithm)."""
    from brainforge.config import load_config, read_yaml

    config_file = run_folder(adapter) / "config.yaml"
    if not config_file.is_file():
        return None
    algorithm = read_yaml(config_file).get("algorithm")
    if not isinstance(algorithm, dict) or algorithm.get("name") != "search_r1":
        return None  # other runs are asked as before, whatever else their saved config needs (custom rewards, data)
    try:
        config = load_config(config_file)
    except ConfigError as exc:
        raise ConfigError(f"{config_file}: the run's saved config does not load, so how it searches is unknown: {exc}") from None
    return config if config.algorithm.name == "search_r1" else None


@dataclass
class SearchAnswer:
    """One question answered by a search policy."""

    question: str
    transcript: str
    """Everything after the prompt: the policy's turns and the inserted observations."""
    answer: str | None
    """The last complete answer block, or None."""
    log: SearchLog = field(default_factory=SearchLog)

    @property
    def searches(self) -> list[str]:
        return list(self.log.queries)


def encode_messages(tokenizer: Any, chat_template: str, messages: list[dict[str, str]]) -> list[int]:
    """Prompt token ids exactly as training encodes them (`GRPOModule.encode_prompt`)."""
    text = tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def answer_with_search(model: Any, tokenizer: Any, config: BrainforgeConfig, prompts: list[list[dict[str, str]]],
                       search: SearchFunction, batch_size: int = 16) -> list[tuple[str, str | None, SearchLog]]:
    """Greedy (temperature 0, one sample) multi-turn search rollouts of chat prompts:
    (transcript, last answer, search log) for each."""
    from brainforge.data.templates import chat_format
    from brainforge.generation.engine import GenerationEngine, SamplingParams
    from brainforge.reasoning.rollout import search_rollout

    settings = config.algorithm.search
    template = chat_format(config.datasets.output_format, tokenizer).template
    engine = GenerationEngine.for_chat(model, tokenizer)
    params = SamplingParams(max_new_tokens=settings.max_turn_tokens, temperature=0.0)
    tags = tags_of(settings)
    out: list[tuple[str, str | None, SearchLog]] = []
    for start in range(0, len(prompts), batch_size):
        ids = [encode_messages(tokenizer, template, messages) for messages in prompts[start : start + batch_size]]
        rollout = search_rollout(engine, ids, 1, params, search, settings)
        assert rollout.search_logs is not None
        for text, search_log in zip(rollout.texts, rollout.search_logs):
            out.append((text, last_answer(text, tags), search_log))
    return out


@dataclass
class SearchPolicy:
    """A loaded search policy: base + adapter, its config's search settings, and its store."""

    model: Any
    tokenizer: Any
    config: BrainforgeConfig
    search: SearchFunction

    @property
    def settings(self) -> SearchSettings:
        return self.config.algorithm.search

    def ask(self, questions: list[str]) -> list[SearchAnswer]:
        prompts = [search_messages(q, self.settings, self.config.data.system_prompt) for q in questions]
        answers = answer_with_search(self.model, self.tokenizer, self.config, prompts, self.search)
        return [SearchAnswer(q, text, answer, search_log) for q, (text, answer, search_log) in zip(questions, answers)]


def load_search_policy(adapter: str | Path, config: BrainforgeConfig, model: str | None = None,
                       store: str | Path | None = None) -> SearchPolicy:
    """The policy of a search_r1 run (`config` from `search_run_config`), searching the
    store its config names or `store`. The store is checked before the model loads."""
    from brainforge.inference import load_chat_model
    from brainforge.reasoning.search_tool import MemorySearch, require_search_store

    if store is not None:
        config.memory.store = str(Path(store).resolve())
    require_search_store(config.memory)
    search = MemorySearch(config.memory, config.algorithm.search)
    chat = load_chat_model(run_folder(adapter), model or config.model.name_or_path)
    return SearchPolicy(chat.model, chat.tokenizer, config, search)
