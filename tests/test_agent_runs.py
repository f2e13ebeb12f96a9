"""`brainforge train` with apo and agent_sft, end to end on the tiny model and an agent file:
the glue between the trainer, the in-process policy server, the trace store and the
algorithm (the algorithms themselves are tested in test_apo.py and test_agent_grpo.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.slow

# Rewards the agent decides itself: 1 for tasks whose id ends in an even digit, else 0, so
# agent SFT keeps exactly those trajectories and APO sees successes and failures.
AGENT = '''
def solve(task, client, prompt=None):
    messages = [{"role": "system", "content": prompt}, {"role": "user", "content": task["prompt"]}]
    reply = client.chat.completions.create(model="policy", messages=messages, max_tokens=6)
    assert reply.choices[0].message.content is not None
    return 1.0 if int(task["task_id"][-1]) % 2 == 0 else 0.0
'''


def write_config(tmp_path, tiny_model_dir, algorithm: dict, **training) -> tuple:
    (tmp_path / "agent.py").write_text(AGENT)
    config = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "peft": {"lora": {"r": 4, "lora_alpha": 8}},
        "data": {"source": {"name": "agent:tools", "type": "prompt", "split": "train", "max_samples": 6}},
        "training": {"output_dir": str(tmp_path / "out"), "run_name": "run", "test_prompts": ["Hi"], "sample_max_new_tokens": 4,
                     **training},
        "algorithm": {"grpo": {"max_new_tokens": 6}, "agent": {"function": "agent.py:solve", "timeout_s": 600,
                                                                "system_prompt": "Be brief."}, **algorithm},
        "logging": {"level": "WARNING"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, tmp_path / "out" / "run"


def train(path) -> None:
    result = subprocess.run([sys.executable, "-m", "brainforge", "train", str(path)], cwd=REPO, capture_output=True, text=True,
                            timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]


def test_brainforge_train_apo_end_to_end(tmp_path, tiny_model_dir):
    from brainforge.agents.store import TraceStore

    apo = {"beam_width": 1, "branch_factor": 2, "rounds": 1, "critique_batch": 1, "train_batch": 2, "validation_batch": 3,
           "test_batch": 2, "optimiser": {"max_tokens": 12}}
    path, run = write_config(tmp_path, tiny_model_dir, {"name": "apo", "apo": apo}, max_steps=1)
    train(path)
    history = json.loads((run / "apo.json").read_text())
    assert history["status"] == "finished" and history["seed_prompt"] == "Be brief."
    assert history["best_prompt"] + "\n" == (run / "best_prompt.txt").read_text()
    assert len(history["candidates"]) >= 1 + 2                                # the seed and the round's two rewrites
    assert history["seed_validation_score"] is not None and history["seed_test_score"] is not None
    store = TraceStore(run / "traces.sqlite", create=False)
    rollouts = store.list_rollouts(limit=1000)
    assert rollouts and all(r.status == "succeeded" for r in rollouts)
    assert not (run / "adapter").exists()                                    # APO trains no weights


def test_brainforge_train_agent_sft_end_to_end(tmp_path, tiny_model_dir):
    agent = {"function": "agent.py:solve", "timeout_s": 600, "system_prompt": "Be brief.", "sft_rollouts_per_task": 2}
    path, run = write_config(tmp_path, tiny_model_dir, {"name": "agent_sft", "agent": agent}, max_steps=2,
                             per_device_batch_size=2)
    train(path)
    examples = [json.loads(line) for line in (run / "agent_sft.jsonl").read_text().splitlines()]
    assert examples and all(e["reward"] == 1.0 for e in examples)             # only the successful trajectories
    assert all(e["task_id"].startswith("tools-train-") and int(e["task_id"][-1]) % 2 == 0 for e in examples)
    assert [m["role"] for m in examples[0]["messages"]][-2:] == ["user", "assistant"]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run / "metrics.json").read_text())["steps"] == 2

    # `brainforge eval` of an agent config: held-out success of base and base + adapter
    from brainforge.agents.tasks import tool_tasks

    out = tmp_path / "eval.json"
    result = subprocess.run([sys.executable, "-m", "brainforge", "eval", str(path), "--adapter", str(run), "--limit", "4",
                             "--output", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    base, tuned = json.loads(out.read_text())
    expected = sum(int(t["task_id"][-1]) % 2 == 0 for t in tool_tasks("test")[:4]) / 4   # the agent's own rule
    assert base["tasks"] == tuned["tasks"] == 4 and base["success_rate"] == tuned["success_rate"] == expected
    assert "base (" in base["model"] and "adapter (" in tuned["model"]
    assert "success" in result.stdout
    from brainforge.agents.store import TraceStore

    eval_store = TraceStore(tmp_path / ".brainforge" / "traces.sqlite", create=False)
    assert len(eval_store.list_rollouts(limit=100)) == 8                      # every held-out rollout recorded
