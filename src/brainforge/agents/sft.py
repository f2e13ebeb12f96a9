"""agent_sft: rejection-sampling fine-tuning on the agent's own successful trajectories.

The agent runs `sft_rollouts_per_task` times on every training task against the policy
(sampled at `algorithm.grpo.temperature`); the rollouts whose reward reaches `min_reward`
are exported from the trace store as chat examples (`agents/export.py`: tool calls and tool
results rendered exactly as the server showed them to the model) into the run folder's
`agent_sft.jsonl`; the ordinary SFT run then trains on that file, loss on the assistant turns.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

from brainforge.agents.export import export_jsonl
from brainforge.agents.run import agent_tasks, open_store, policy_server, server_api_key
from brainforge.agents.runner import load_agent, run_rollouts
from brainforge.config import BrainforgeConfig, SourceConfig
from brainforge.errors import DataError

log = logging.getLogger(__name__)

DATA_NAME = "agent_sft.jsonl"


def collect_sft_data(config: BrainforgeConfig, run_dir: Path, model: Any, tokenizer: Any, reuse: bool = False) -> BrainforgeConfig:
    """Sample and keep the successful trajectories; returns the config of the SFT run on them
    (`reuse`: a resumed run keeps the data it already collected)."""
    from brainforge.data.templates import chat_format

    data_path = run_dir / DATA_NAME
    if not (reuse and data_path.is_file()):
        agent_settings, grpo = config.algorithm.agent, config.algorithm.grpo
        tasks = agent_tasks(config)
        store = open_store(config, run_dir)
        server = policy_server(config, model, tokenizer, chat_format(config.datasets.output_format, tokenizer).template, store,
                               forced_sampling=(grpo.temperature, grpo.top_p))
        log.info("agent_sft: %d rollouts on each of %d tasks to find successful trajectories", agent_settings.sft_rollouts_per_task, len(tasks))
        with server:
            results = run_rollouts(load_agent(agent_settings), tasks, agent_settings.sft_rollouts_per_task, server.base_url, store,
                                   prompt=agent_settings.system_prompt, timeout_s=agent_settings.timeout_s,
                                   max_concurrency=agent_settings.max_concurrency, group_prefix="agent_sft/",
                                   api_key=server_api_key(config))
        statuses = Counter(r.status for r in results)
        kept = sum(1 for r in results if r.reward is not None and r.reward >= agent_settings.min_reward)
        log.info("agent_sft: %d of %d rollouts reached reward >= %g (%s)", kept, len(results), agent_settings.min_reward,
                 ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())))
        if kept == 0:
            raise DataError(f"agent_sft: none of {len(results)} rollouts on {len(tasks)} tasks reached reward >= "
                            f"{agent_settings.min_reward:g}; nothing to imitate. Raise algorithm.agent.sft_rollouts_per_task, "
                            "lower algorithm.agent.min_reward, or improve the agent's prompt first (algorithm.name: apo)")
        report = export_jsonl(store, data_path, status="succeeded", min_reward=agent_settings.min_reward, force=True)
        log.info("agent_sft: %s", report.summary())
    sft = config.model_copy(deep=True)
    sft.datasets.multi_source_enabled = False
    sft.data.source = SourceConfig(path=str(data_path), type="chat")
    return sft
