"""What `merge` and `generate` hand the user is really base + adapter (issue 8, section 7).

The earlier tests passed if the adapter were ignored: `generate` only checked that something
was printed, `merge` only that a model loads. Here the adapter has large random LoRA B, so
base and base + adapter answer differently, and the outputs are compared with what plain
PEFT computes.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
PROMPT = "Tell me a story about a dragon."
NEW_TOKENS = 8


def brainforge(*args):
    return subprocess.run([sys.executable, "-m", "brainforge", *args], capture_output=True, text=True, timeout=600, env=ENV)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir, tokenizer):
    from adapter_fixtures import make_random_adapter

    return make_random_adapter(tmp_path_factory.mktemp("adapter") / "adapter", tiny_model_dir, tokenizer)


def peft_and_base(tiny_model_dir, adapter, dtype):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype).eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype), str(adapter)).eval()
    return with_adapter, base


@pytest.mark.slow
def test_generate_uses_the_adapter(tiny_model_dir, adapter):
    from transformers import AutoTokenizer

    from brainforge.hardware import resolve_dtype
    from brainforge.inference import ChatModel

    with_adapter, base = peft_and_base(tiny_model_dir, adapter, resolve_dtype("auto"))  # the dtype `generate` loads in
    tokenizer = AutoTokenizer.from_pretrained(str(adapter))
    expected = ChatModel(with_adapter, tokenizer).generate([PROMPT], max_new_tokens=NEW_TOKENS)[0]
    plain = ChatModel(base, tokenizer).generate([PROMPT], max_new_tokens=NEW_TOKENS)[0]
    assert expected != plain, "the adapter does not change the greedy answer; the test could not tell"
    result = brainforge("generate", "--adapter", str(adapter), "--max-new-tokens", str(NEW_TOKENS), PROMPT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f">>> {PROMPT}\n{expected}\n" in result.stdout, (result.stdout, expected, plain)


@pytest.mark.slow
def test_merged_model_matches_the_adapter(tmp_path, tiny_model_dir, adapter):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from brainforge.inference import ChatModel

    out = tmp_path / "merged"
    result = brainforge("merge", str(adapter), "--out", str(out), "--dtype", "float32")
    assert result.returncode == 0, result.stderr[-2000:]
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with_adapter, base = peft_and_base(tiny_model_dir, adapter, torch.float32)
    ids = torch.tensor([[5, 17, 230, 4011, 88, 9, 1200, 31]])
    with torch.no_grad():
        want, got, plain = with_adapter(ids).logits, merged(ids).logits, base(ids).logits
    assert not torch.allclose(want, plain, atol=1e-2)            # the adapter matters
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), float((got - want).abs().max())
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert ChatModel(merged, tokenizer).generate([PROMPT], max_new_tokens=NEW_TOKENS) == \
        ChatModel(with_adapter, tokenizer).generate([PROMPT], max_new_tokens=NEW_TOKENS)
