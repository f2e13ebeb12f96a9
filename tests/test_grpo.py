"""GRPO end to end on a tiny model, and the reference-policy property."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(TESTS) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def grpo_config(tmp_path, model_dir, rewards, **grpo):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n" for i in range(8)))
    config = {
        "model": {"name_or_path": str(model_dir)},
        "peft": {"lora": {"r": 4, "lora_alpha": 8}},
        "data": {"source": {"path": str(prompts), "type": "prompt"}},
        "algorithm": {"name": "grpo", "grpo": {
            "num_generations": 4, "prompts_per_step": 2, "micro_batch_size": 4, "max_new_tokens": 12,
            "temperature": 1.0, "beta": 0.04, "reward_functions": rewards, "log_completions_every_n_steps": 1, **grpo}},
        "training": {"output_dir": str(tmp_path / "outputs"), "max_steps": 3, "learning_rate": 1e-2,
                     "save_every_n_steps": 2, "test_prompts": ["What is 2 + 2?"], "sample_max_new_tokens": 6},
    }
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def brainforge(*args):
    return subprocess.run([sys.executable, "-m", "brainforge", *args], capture_output=True, text=True, timeout=900, env=ENV)


def test_grpo_run_writes_adapter_curves_and_logs(tmp_path, tiny_model_dir):
    config = grpo_config(tmp_path, tiny_model_dir, [{"name": "reward_fixtures.length_reward", "weight": 1.0},
                                                    {"name": "last_number", "weight": 0.5}])
    result = brainforge("train", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = list((tmp_path / "outputs").iterdir())
    assert (run / "adapter" / "adapter_model.safetensors").exists() and (run / "reward_kl.png").stat().st_size > 1000
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 3 and set(metrics["seconds_per_step_by_phase"]) == {"plan", "generation", "rewards", "reference", "loss", "optimizer", "remember"}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars, texts = set(), set()
    for events in (run / "tensorboard").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        scalars |= set(acc.Tags()["scalars"])
        texts |= set(acc.Tags().get("tensors", []))
    expected = {"reward/mean", "reward/std", "reward/reward_fixtures.length_reward/mean", "reward/last_number/mean",
                "advantage/mean", "grpo/kl", "grpo/clip_fraction", "frac_reward_zero_std", "completion/length_mean",
                "completion/truncated_frac", "grpo/entropy", "tokens_per_s/step", "time/generation_s", "grpo/loss"}
    assert expected <= scalars, expected - scalars
    assert any("completions" in t for t in texts)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(run / "adapter"))
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # the policy moved


def test_broken_reward_is_named(tmp_path, tiny_model_dir):
    config = grpo_config(tmp_path, tiny_model_dir, [{"name": "reward_fixtures.broken_reward"}])
    result = brainforge("train", str(config))
    assert result.returncode == 2 and "reward function 'reward_fixtures.broken_reward' raised RuntimeError" in result.stderr
    assert "Traceback" not in result.stderr


def test_broken_reward_can_score_none_instead(tmp_path, tiny_model_dir):
    config = grpo_config(tmp_path, tiny_model_dir, [{"name": "reward_fixtures.broken_reward"}, {"name": "reward_fixtures.length_reward"}],
                         reward_errors="none")
    result = brainforge("train", str(config))
    assert result.returncode == 0, result.stderr[-2000:]


def test_reference_is_the_base_model_with_adapter_disabled(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from brainforge.config import GRPOSettings, LoraSettings, TrainingConfig
    from brainforge.data.templates import chat_format
    from brainforge.models.loader import attach_lora
    from brainforge.training.grpo import GRPOModule

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    policy = attach_lora(base, LoraSettings(r=4))
    settings = GRPOSettings(num_generations=2, prompts_per_step=1, max_new_tokens=6, temperature=0.8,
                            reward_functions=[{"name": "last_number"}])
    module = GRPOModule(policy, tokenizer, chat_format("chatml", tokenizer).template, settings, TrainingConfig(max_steps=1), 1)
    rollout = module.engine.generate([[5, 6, 7, 8]], 2, module.sampling)
    policy_logps, _ = module.completion_logps(rollout, grad=False)
    reference = module.reference_logps(rollout)
    mask = rollout.completion_mask.bool()
    assert torch.allclose(policy_logps[mask], reference[mask], atol=1e-5)  # LoRA B = 0: KL is 0 at init

    for name, param in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    moved, _ = module.completion_logps(rollout, grad=False)
    assert not torch.allclose(moved[mask], reference[mask], atol=1e-3)
    # Reference log-probs equal a plain base model's, computed independently, at the same temperature.
    for row in range(2):
        completion = rollout.completion_ids[row][mask[row]]
        ids = torch.tensor([rollout.prompt_ids[row] + completion.tolist()])
        logits = plain(ids).logits[0, len(rollout.prompt_ids[row]) - 1 : -1] / 0.8
        expected = torch.log_softmax(logits, -1).gather(1, completion[:, None]).squeeze(1)
        assert torch.allclose(module.reference_logps(rollout)[row][mask[row]], expected, atol=1e-4)


def test_reference_can_be_a_given_adapter(tmp_path, tiny_model_dir, tokenizer):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from brainforge.config import GRPOSettings, LoraSettings, TrainingConfig
    from brainforge.data.templates import chat_format
    from brainforge.models.loader import attach_lora
    from brainforge.training.grpo import GRPOModule

    reference = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, target_modules="all-linear"))
    for name, param in reference.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    reference.save_pretrained(tmp_path / "ref")
    expected_model = reference.eval()

    policy = attach_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraSettings(r=4))
    policy.load_adapter(str(tmp_path / "ref"), adapter_name="reference", is_trainable=False)
    policy.set_adapter("default")
    settings = GRPOSettings(num_generations=2, prompts_per_step=1, max_new_tokens=5, temperature=1.0,
                            reward_functions=[{"name": "last_number"}], reference_adapter=str(tmp_path / "ref"))
    module = GRPOModule(policy, tokenizer, chat_format("chatml", tokenizer).template, settings, TrainingConfig(max_steps=1), 1)
    rollout = module.engine.generate([[5, 6, 7]], 2, module.sampling)
    got = module.reference_logps(rollout)
    row = 0
    mask = rollout.completion_mask[row].bool()
    completion = rollout.completion_ids[row][mask]
    ids = torch.tensor([rollout.prompt_ids[row] + completion.tolist()])
    logits = expected_model(ids).logits[0, 2:-1]
    expected = torch.log_softmax(logits, -1).gather(1, completion[:, None]).squeeze(1)
    assert torch.allclose(got[row][mask], expected, atol=1e-4)
    # The trained adapter is still the active one, and only its weights train.
    assert policy.active_adapter == "default"
    assert all("reference" not in n for n, p in policy.named_parameters() if p.requires_grad)


def test_warnings_for_no_signal_entropy_collapse_and_degeneration(caplog):
    from collections import deque
    from types import SimpleNamespace

    from brainforge.training.grpo import GRPOModule

    state = SimpleNamespace(_zero_signal_streak=0, _reward_window=deque(maxlen=20))
    calm = {"frac_reward_zero_std": 0.0, "entropy": 1.0, "reward/mean": 0.1, "completion/repetition": 0.0, "completion/truncated_frac": 0.0}
    with caplog.at_level("WARNING", logger="brainforge.training.grpo"):
        for _ in range(5):
            GRPOModule._warn(state, {**calm, "frac_reward_zero_std": 1.0})
        assert "carry no learning signal" in caplog.text
        GRPOModule._warn(state, {**calm, "entropy": 0.01})
        assert "entropy collapsed" in caplog.text
        assert "gaming the reward" not in caplog.text
        for i in range(20):
            GRPOModule._warn(state, {**calm, "reward/mean": i / 20, "completion/repetition": 0.8})
        assert "gaming the reward" in caplog.text
