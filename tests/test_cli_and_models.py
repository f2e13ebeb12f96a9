"""Bad input through the CLI: one clear line, exit 2, no traceback. Plus model loading paths."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import write_config

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def brainforge(*args):
    return subprocess.run([sys.executable, "-m", "brainforge", *args], capture_output=True, text=True, timeout=600, env=ENV)


def assert_user_error(result, fragment):
    assert result.returncode == 2, (result.stdout[-1000:], result.stderr[-2000:])
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr


def test_every_command_has_help():
    for command in (["train"], ["config", "validate"], ["data", "preview"], ["merge"], ["generate"], ["chat"], ["doctor"]):
        result = brainforge(*command, "--help")
        assert result.returncode == 0 and "Usage" in result.stdout, command


def test_missing_config_file(tmp_path):
    assert_user_error(brainforge("train", str(tmp_path / "nope.yaml")), "config file not found")


def test_unknown_key_via_validate(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {source: {name: 'sample:chat'}}\ntraining: {max_steps: 1, epochz: 2}\n")
    assert_user_error(brainforge("config", "validate", str(path)), "training.epochz: unknown key")


def test_debug_shows_traceback(tmp_path):
    result = brainforge("--debug", "train", str(tmp_path / "nope.yaml"))
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_validate_ok_and_override():
    result = brainforge("config", "validate", "configs/sft_demo.yaml", "--set", "training.max_steps=7")
    assert result.returncode == 0 and "max_steps: 7" in result.stdout


def test_missing_model_path(tmp_path, tiny_model_dir):
    config = write_config(tmp_path / "c.yaml", tmp_path / "no-such-model")
    assert_user_error(brainforge("train", str(config)), "does not exist")


def test_missing_dataset_file(tmp_path, tiny_model_dir):
    config = write_config(tmp_path / "c.yaml", tiny_model_dir,
                          datasets={"sources": [{"path": "missing.jsonl", "type": "chat"}]})
    assert_user_error(brainforge("train", str(config)), "dataset file not found")


def test_corrupt_gguf(tmp_path):
    from brainforge.errors import ModelError
    from brainforge.models.loader import resolve_model_path

    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(ModelError, match="not a GGUF file"):
        resolve_model_path(str(bad))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 8)
    with pytest.raises(ModelError, match="could not read this GGUF model"):
        resolve_model_path(str(truncated))


def test_adapter_that_does_not_match_base(tmp_path, tiny_model_dir, tokenizer):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from brainforge.errors import ModelError
    from brainforge.models.loader import load_adapter

    other = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    get_peft_model(other, LoraConfig(r=4, target_modules="all-linear")).save_pretrained(tmp_path / "wrong")
    base = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ModelError, match="does not match the base model"):
        load_adapter(base, tmp_path / "wrong")
    with pytest.raises(ModelError, match="not a PEFT adapter folder"):
        load_adapter(base, tmp_path)


def test_qlora_trains_on_a_4bit_base(tiny_model_dir):
    from brainforge.config import LoraSettings, ModelConfig, QuantizationConfig
    from brainforge.models.loader import attach_lora, load_base_model

    base = load_base_model(ModelConfig(name_or_path=str(tiny_model_dir)), torch.float32,
                           QuantizationConfig(load_in_4bit=True, bnb_4bit_compute_dtype="float32"))
    assert type(base.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    model = attach_lora(base, LoraSettings(r=4), gradient_checkpointing=True)
    ids = torch.randint(10, 1000, (2, 12))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    # lora_B starts at zero, so its gradient (not lora_A's) is the one that must be live.
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_continue_from_existing_adapter(tmp_path, tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from brainforge.config import LoraSettings, ModelConfig
    from brainforge.models.loader import attach_lora, load_base_model

    seed = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=2, target_modules=["q_proj"]))
    torch.nn.init.normal_(seed.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight)
    seed.save_pretrained(tmp_path / "start")
    model = attach_lora(load_base_model(ModelConfig(name_or_path=str(tiny_model_dir)), torch.float32),
                        LoraSettings(r=8), adapter_path=str(tmp_path / "start"))
    lora_b = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert lora_b.shape[1] == 2 and lora_b.requires_grad and lora_b.abs().sum() > 0


def test_doctor_reports_cpu_and_packages():
    result = brainforge("doctor")
    assert result.returncode == 0, result.stderr
    assert "fast bf16 on cpu" in result.stdout and "default model" in result.stdout and "torch " in result.stdout
