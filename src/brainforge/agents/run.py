"""Config in, run folder out, for the agent algorithms: agent_grpo (weights, through the GRPO
run), apo (the agent's prompt) and agent_sft (successful trajectories, then the SFT run).

Each run folder holds `traces.sqlite`, the trace store of every rollout and LLM call the
run made (`brainforge traces list --store RUN`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from brainforge.agents.runner import load_agent
from brainforge.agents.store import TraceStore
from brainforge.config import BrainforgeConfig
from brainforge.errors import ConfigError

log = logging.getLogger(__name__)

STORE_NAME = "traces.sqlite"


def open_store(config: BrainforgeConfig, run_dir: Path) -> TraceStore:
    return TraceStore(config.algorithm.server.store or run_dir / STORE_NAME)


def server_api_key(config: BrainforgeConfig) -> str | None:
    """The key clients must send, from the environment variable the config names."""
    name = config.algorithm.server.api_key_env
    if name is None:
        return None
    key = os.environ.get(name)
    if not key:
        raise ConfigError(f"algorithm.server.api_key_env: the environment variable {name} is not set (or empty)")
    return key


def policy_server(config: BrainforgeConfig, model: Any, tokenizer: Any, chat_template: str, store: TraceStore,
                  forced_sampling: tuple[float, float] | None, max_tokens: int | None = None) -> Any:
    """The in-process server the agent's calls go through; each call's completion is capped
    at `max_tokens`, by default `algorithm.grpo.max_new_tokens` (the length the GRPO loss is
    normalised for)."""
    from brainforge.agents.server import PolicyServer

    settings = config.algorithm.server.model_copy(update={"max_tokens": max_tokens or config.algorithm.grpo.max_new_tokens})
    return PolicyServer(model, tokenizer, chat_template, settings, store, model_name="policy", forced_sampling=forced_sampling)


def build_agent_grpo_module(config: BrainforgeConfig, model: Any, tokenizer: Any, chat_template: str, total_steps: int,
                            run_dir: Path) -> Any:
    from brainforge.agents.agent_grpo import AgentGRPOModule

    settings = config.algorithm.grpo
    agent = load_agent(config.algorithm.agent)
    store = open_store(config, run_dir)
    # Training samples at the configured temperature whatever the agent asks for: the loss's
    # log-probs are taken at that temperature, and GRPO needs varied samples per group.
    server = policy_server(config, model, tokenizer, chat_template, store, forced_sampling=(settings.temperature, settings.top_p))
    return AgentGRPOModule(model, tokenizer, chat_template, settings, config.training, total_steps, agent=agent,
                           agent_settings=config.algorithm.agent, server=server, store=store, api_key=server_api_key(config))


def agent_tasks(config: BrainforgeConfig, split: str | None = None) -> list[dict[str, Any]]:
    """The tasks of the configured sources, as agents get them: the training tasks (each
    source at its own split, `max_samples` applied), or all of a held-out `split`
    (`max_samples` limits what is trained on, not what a model is judged on)."""
    from brainforge.agents.runner import task_dict
    from brainforge.data.prompts import load_prompts

    sources = config.sources()
    if split is not None:
        sources = [source.model_copy(update={"max_samples": None}) for source in sources]
    return [task_dict(p) for p in load_prompts(sources, config.data.system_prompt, split=split)]


def run_apo_job(config: BrainforgeConfig, run_dir: Path, model: Any, tokenizer: Any) -> Path:
    """APO: the agent runs on the local policy (weights unchanged) while the optimiser, the
    same local model or any OpenAI-compatible endpoint, critiques and rewrites its prompt.
    Writes apo.json (full history) and best_prompt.txt into the run folder."""
    from brainforge.agents.apo import EvaluatedRollout, OptimiserClient, run_apo, transcript_text
    from brainforge.agents.runner import run_rollouts
    from brainforge.data.templates import chat_format

    apo, agent_settings = config.algorithm.apo, config.algorithm.agent
    train = agent_tasks(config)
    validation = agent_tasks(config, apo.validation_split)
    test = agent_tasks(config, apo.test_split)
    if apo.validation_split == apo.test_split:
        log.warning("algorithm.apo: validation_split and test_split are both %r; the test score is then not held out", apo.test_split)
    agent = load_agent(agent_settings)
    store = open_store(config, run_dir)
    api_key = server_api_key(config)
    server = policy_server(config, model, tokenizer, chat_format(config.datasets.output_format, tokenizer).template, store,
                           forced_sampling=(apo.rollout_temperature, 1.0),   # the agent's calls; not the optimiser's
                           max_tokens=max(config.algorithm.grpo.max_new_tokens, apo.optimiser.max_tokens))
    with server:
        url = server.base_url

        def evaluate(prompt: str, tasks: list[dict[str, Any]]) -> list[EvaluatedRollout]:
            results = run_rollouts(agent, tasks, 1, url, store, prompt=prompt, timeout_s=agent_settings.timeout_s,
                                   max_concurrency=agent_settings.max_concurrency, group_prefix="apo/", api_key=api_key)
            return [EvaluatedRollout(reward=r.reward if r.status == "succeeded" else None,
                                     transcript=transcript_text(store.get_rollout(r.rollout_id)), task_id=r.rollout_id)
                    for r in results]

        optimiser = OptimiserClient(apo.optimiser, url, local_api_key=api_key, local_model="policy")
        result = run_apo(apo, agent_settings.system_prompt, evaluate, optimiser, train, validation, test, run_dir,
                         seed=config.training.seed)
    log.info("APO: validation %.3f -> %.3f, test %.3f -> %.3f; best prompt in %s", result.seed_validation, result.best_validation,
             result.seed_test, result.best_test, run_dir / "best_prompt.txt")
    return run_dir
