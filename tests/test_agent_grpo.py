"""agent_grpo: the trainer learns from exactly what the server sampled.

* the log-probs the trainer computes for recorded completions equal the sampling log-probs
  the server recorded (no retokenisation drift: rows are built from recorded token ids);
* only sampled tokens carry gradient: the loss's gradient equals that of a hand-written
  objective over the sampled completion tokens alone (tool outputs and earlier turns sit in
  the prompt), and a group with equal rewards gives no gradient at all;
* `brainforge train` with agent_grpo runs end to end on a tiny model and an agent file.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import yaml

from tests.conftest import REPO

TEMPERATURE = 0.9


@pytest.fixture()
def served(tmp_path, tiny_model_dir, tokenizer):
    """A LoRA policy (non-zero adapter) behind a PolicyServer with a store, and its module."""
    from transformers import AutoModelForCausalLM

    from brainforge.agents.agent_grpo import AgentGRPOModule
    from brainforge.agents.runner import Agent
    from brainforge.agents.server import PolicyServer
    from brainforge.agents.store import TraceStore
    from brainforge.config import AgentSettings, GRPOSettings, LoraSettings, PolicyServerSettings, TrainingConfig
    from brainforge.data.templates import chat_format
    from brainforge.models.loader import attach_lora

    torch.manual_seed(0)
    policy = attach_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), LoraSettings(r=4, lora_dropout=0.0))
    for name, param in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.3)  # an adapter that changes the outputs: the served policy is not the base
    template = chat_format("chatml", tokenizer).template
    store = TraceStore(tmp_path / "traces.sqlite")
    settings = GRPOSettings(num_generations=2, prompts_per_step=1, max_new_tokens=12, temperature=TEMPERATURE, beta=0.0,
                            reward_functions=[{"name": "last_number"}])
    server = PolicyServer(policy, tokenizer, template, PolicyServerSettings(max_tokens=12), store,
                          forced_sampling=(TEMPERATURE, 1.0))
    module = AgentGRPOModule(policy, tokenizer, template, settings, TrainingConfig(max_steps=1), 1, agent=Agent(lambda t, c: 0.0),
                             agent_settings=AgentSettings(), server=server, store=store)
    url = server.start()
    try:
        yield module, url, store
    finally:
        server.stop()


def two_call_rollout(url: str, store, rollout_id: str) -> None:
    """An agent's rollout: a call, a tool result, a second call that sees it."""
    from brainforge.agents.runner import openai_client

    client = openai_client(url, rollout_id, None, 300)
    tools = [{"type": "function", "function": {"name": "calculator", "description": "Evaluate arithmetic",
                                               "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}}}}]
    messages = [{"role": "user", "content": "What is 12 * 34?"}]
    first = client.chat.completions.create(model="policy", messages=messages, tools=tools, max_tokens=12, temperature=0.1)
    messages += [{"role": "assistant", "content": first.choices[0].message.content or "",
                  "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "12*34"}'}}]},
                 {"role": "tool", "tool_call_id": "call_1", "content": "408"}]
    client.chat.completions.create(model="policy", messages=messages, tools=tools, max_tokens=12)


def two_recorded_rollouts(url: str, store) -> list:
    """Two rollouts of one task, two calls each, as the store recorded them."""
    rollout_ids = [store.start_rollout(task_id="t", group_id="g") for _ in range(2)]
    for rollout_id in rollout_ids:
        two_call_rollout(url, store, rollout_id)
    return [store.calls(r) for r in rollout_ids]


def test_trainer_logprobs_equal_the_recorded_sampling_logprobs(served):
    from brainforge.agents.agent_grpo import transitions

    module, url, store = served
    calls = two_recorded_rollouts(url, store)
    assert [len(c) for c in calls] == [2, 2]
    assert all(c.params["temperature"] == TEMPERATURE for made in calls for c in made)  # the trainer's temperature, not the agent's 0.1
    # the second call's prompt holds the first call's tool result: it is prompt, not completion
    assert "408" in module.tokenizer.decode(calls[0][1].prompt_ids)
    rollout, advantages, owner = transitions(calls, torch.tensor([1.0, 0.0]), 2, "group", module.engine.pad_id)
    assert owner.tolist() == [0, 0, 1, 1]
    for row, call in enumerate(c for made in calls for c in made):  # rows are the recorded ids, untouched
        assert rollout.prompt_ids[row] == call.prompt_ids
        assert rollout.completion_ids[row, : len(call.completion_ids)].tolist() == call.completion_ids
    trained = module.frozen_logps(rollout)                      # the loss pass's packed forward, eval mode
    mask = rollout.completion_mask.bool()
    assert torch.allclose(trained[mask], rollout.logprobs[mask], atol=2e-4), (trained[mask] - rollout.logprobs[mask]).abs().max()


def test_gradient_flows_only_through_sampled_tokens(served):
    from brainforge.agents.agent_grpo import transitions
    from brainforge.rl.losses import StepTotals, loss_pass

    module, url, store = served
    calls = two_recorded_rollouts(url, store)
    rollout, advantages, _ = transitions(calls, torch.tensor([1.0, 0.0]), 2, "group", module.engine.pad_id)
    assert advantages.tolist()[0] > 0 > advantages.tolist()[-1]
    params = [p for p in module.model.parameters() if p.requires_grad]
    mask = rollout.completion_mask.float()
    module.model.eval()

    def grads_of_step(adv: torch.Tensor) -> list[torch.Tensor]:
        for p in params:
            p.grad = None
        loss_pass(lambda rows: module.completion_logps(rollout, rows=rows, grad=True)[0], adv, mask, module.loss_config,
                  StepTotals.of(mask), None)
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    step = grads_of_step(advantages)
    # Hand-written objective: each row's prompt + completion through a plain forward, the
    # log-probs of the sampled completion tokens only, -A * logp summed over the step's tokens.
    for p in params:
        p.grad = None
    total = mask.sum()
    objective = torch.zeros(())
    for row in range(len(rollout.prompt_ids)):
        n = int(mask[row].sum())
        completion = rollout.completion_ids[row, :n]
        ids = torch.tensor([rollout.prompt_ids[row] + completion.tolist()])
        logits = module.model(input_ids=ids).logits[0, len(rollout.prompt_ids[row]) - 1 : -1].float() / TEMPERATURE
        logp = torch.log_softmax(logits, -1).gather(1, completion[:, None]).squeeze(1)
        objective = objective - advantages[row] * logp.sum() / total
    objective.backward()
    hand = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    assert any(float(g.abs().max()) > 0 for g in step)
    for got, expected in zip(step, hand):
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-3)
    # equal rewards: advantage 0 everywhere, no gradient at all
    _, flat, _ = transitions(calls, torch.tensor([0.5, 0.5]), 2, "group", module.engine.pad_id)
    assert all(float(g.abs().max()) == 0 for g in grads_of_step(flat))


def test_transitions_credit_and_exclusions():
    from brainforge.agents.agent_grpo import transitions
    from brainforge.agents.store import CallRecord

    def call(ids, reward=None):
        return CallRecord(rollout_id="r", messages=[], tools=None, prompt_ids=[1, 2], completion_ids=ids, logprobs=[-0.5] * len(ids),
                          text="", tool_calls=[], finish_reason="stop", params={}, reward=reward)

    calls = [[call([5, 6]), call([7])], [call([8])], [call([9])], []]        # group 0: rollouts 0, 1; group 1: rollouts 2, 3
    rewards = torch.tensor([1.0, 0.0, 1.0, math.nan])                          # rollout 3 failed: no reward
    rollout, advantages, owner = transitions(calls, rewards, 2, "none", 0)
    assert owner.tolist() == [0, 0, 1, 2]                                      # every call of a rollout is a row; failed rollout none
    assert advantages.tolist() == [0.5, 0.5, -0.5, 0.0]                        # both calls get the rollout's advantage; lone rollout 0
    assert rollout.completion_mask.tolist() == [[1, 1], [1, 0], [1, 0], [1, 0]]
    per_call = [[call([5]), call([6], reward=0.0)], [call([8])]]               # a call with its own reward: same group baseline
    _, advantages, _ = transitions(per_call, torch.tensor([1.0, 0.0]), 2, "none", 0)
    assert advantages.tolist() == [0.5, -0.5, -0.5]


AGENT = '''
def solve(task, client, prompt=None):
    messages = [{"role": "system", "content": prompt}, {"role": "user", "content": task["prompt"]}]
    first = client.chat.completions.create(model="policy", messages=messages, max_tokens=6)
    messages += [{"role": "assistant", "content": first.choices[0].message.content or ""},
                 {"role": "user", "content": "Again."}]
    second = client.chat.completions.create(model="policy", messages=messages, max_tokens=6)
    if task["kind"] == "crash":
        raise RuntimeError("agent bug")
    return float(len(second.choices[0].message.content or "") % 3)
'''


@pytest.mark.slow
def test_brainforge_train_agent_grpo_end_to_end(tmp_path, tiny_model_dir):
    (tmp_path / "agent.py").write_text(AGENT)
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"prompt": f"Count to {i}.", "kind": "crash" if i == 3 else "ok", "id": f"t{i}"}) + "\n"
                             for i in range(4)))
    config = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "peft": {"lora": {"r": 4, "lora_alpha": 8}},
        "data": {"source": {"path": str(tasks), "type": "prompt"}},
        "training": {"output_dir": str(tmp_path / "out"), "run_name": "agent", "max_steps": 2, "learning_rate": 1e-3,
                     "save_every_n_steps": 1, "test_prompts": ["Hi"], "sample_max_new_tokens": 4},
        "algorithm": {"name": "agent_grpo",
                      "grpo": {"num_generations": 2, "prompts_per_step": 2, "max_new_tokens": 6, "beta": 0.04},
                      "agent": {"function": "agent.py:solve", "timeout_s": 600, "system_prompt": "Be brief."}},
        "logging": {"level": "WARNING"},
    }
    path = tmp_path / "agent_grpo.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "brainforge", "train", str(path)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "out" / "agent"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert list((run / "tensorboard").rglob("events.out.tfevents*"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 2 and "agent" in metrics
    from brainforge.agents.store import TraceStore

    store = TraceStore(run / "traces.sqlite", create=False)
    rollouts = store.list_rollouts()
    assert len(rollouts) == 2 * 2 * 2                                   # steps x tasks per step x K
    finished = [r for r in rollouts if r.status == "succeeded"]
    assert finished and all(r.num_calls == 2 for r in finished)
    versions = {c.policy_version for r in finished for c in store.calls(r.rollout_id)}
    assert versions == {"step-0", "step-1"}                             # the second step was served by the updated adapter


def test_shared_prefix_logprobs_and_gradients_equal_the_padding_free_path(served):
    """The loss pass computes the calls' common beginning (tools, system prompt) once; its
    log-probs, entropies and adapter gradients are those of laying each call out in full."""
    from brainforge.agents.agent_grpo import MIN_SHARED_PREFIX, transitions
    from brainforge.training.grpo import GRPOModule
    from brainforge.training.shared_prefix import prefix_groups

    module, url, store = served
    rollout, advantages, _ = transitions(two_recorded_rollouts(url, store), torch.tensor([1.0, 0.0]), 2, "group",
                                         module.engine.pad_id)
    groups = prefix_groups(rollout.prompt_ids, MIN_SHARED_PREFIX)
    assert any(len(rows) >= 2 and shared >= MIN_SHARED_PREFIX for rows, shared in groups)   # the shared path is taken
    params = [p for p in module.model.parameters() if p.requires_grad]
    mask = rollout.completion_mask.bool()

    def run(logps_of) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        for p in params:
            p.grad = None
        logps, entropy = logps_of(rollout, grad=True, entropy_grad=True)
        objective = -(advantages[:, None] * logps * mask).sum() - 0.1 * (entropy * mask).sum()
        objective.backward()
        return logps.detach(), entropy.detach(), [p.grad.clone() for p in params]

    shared = run(module.completion_logps)
    packed = run(lambda *a, **k: GRPOModule.completion_logps(module, *a, **k))
    assert torch.allclose(shared[0][mask], packed[0][mask], atol=1e-5)
    assert torch.allclose(shared[1][mask], packed[1][mask], atol=1e-5)
    assert (shared[0][~mask] == 0).all()
    assert any(float(g.abs().max()) > 0 for g in shared[2])
    for got, expected in zip(shared[2], packed[2]):
        assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()  # fp32 summation order


def test_common_prefix_length():
    from brainforge.training.shared_prefix import common_prefix_length

    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix_length([[1, 2], [1, 2]]) == 2
    assert common_prefix_length([[7], [1, 2]]) == 0
    assert common_prefix_length([]) == 0


def test_prefix_groups_put_long_shared_beginnings_together():
    from brainforge.training.shared_prefix import prefix_groups

    system_a, system_b = list(range(100, 200)), list(range(300, 400))
    prompts = [system_a + [1, 2], system_b + [5], system_a + [1, 3, 4], [9, 9], system_a + [7], system_b + [6, 6]]
    groups = dict((tuple(rows), shared) for rows, shared in prefix_groups(prompts, 64))
    assert groups == {(0, 2, 4): 100, (1, 5): 100, (3,): 0}
    assert prefix_groups([system_a, system_a + [1]], 64) == [([0, 1], 99)]   # every prompt keeps a token after the prefix
    assert prefix_groups([system_a[:10], system_a[:10] + [1]], 64) == [([0], 0), ([1], 0)]   # too short to share
    assert prefix_groups([system_a + [1], system_b + [2]], 64) == [([0], 0), ([1], 0)]         # alone: nothing to share
