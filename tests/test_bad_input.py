"""The bad-input suite (issue 8, section 4): every input below used to give a traceback, a
hang or a blow-up. Each is now a one-line error (exit 2) naming the file, key or line and
the fix, and the files that were there before are all still there, byte for byte.

CLI tests run the real `brainforge` in a subprocess. Deadlines are generous (a busy 2-core
machine); the timing assertions are on the in-process call, where imports do not count.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml

from brainforge.errors import BrainforgeError, ConfigError, DataError, ModelError, StoreError
from conftest import REPO, write_config

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
GIB = 1024**3


def brainforge(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 300,
               stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "brainforge", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env or ENV, input=stdin if stdin is not None else "")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def alias_bomb(levels: int, width: int = 9) -> str:
    """Billion laughs: `levels` anchors, each a list of `width` aliases of the previous one,
    the last used as training.test_prompts (so validation and its error message walk it)."""
    lines = [f"a0: &a0 [{', '.join(['lol'] * width)}]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels)]
    return "x-bomb:\n" + "".join(f"  {line}\n" for line in lines) + f"training:\n  test_prompts: *a{levels - 1}\n"


# ------------------------------------------------------------------------ YAML


def test_yaml_alias_bomb_is_refused_quickly_with_bounded_memory(tmp_path):
    from brainforge.config import load_config

    # 9 levels of 9: 9**9 = 387M values as expanded, in 542 bytes. The old loader handed
    # pydantic the shared tree and the error message showed it: 8 levels took 37 s and
    # 1.3 GB in `config validate`, and each level multiplies both by 9.
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb(9))
    assert len(bomb.read_bytes()) < 600
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"bomb.yaml:\d+:\d+: invalid YAML: .*expands to more than .*aliases"):
        load_config(bomb)
    seconds = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert seconds < 10, seconds
    assert peak < 50 * 1024**2, peak
    # self-reference and very deep nesting are refused the same way
    (tmp_path / "cycle.yaml").write_text("training: &t\n  test_prompts: [*t]\n")
    with pytest.raises(ConfigError, match=r"cycle.yaml:\d+:\d+: .*cycle"):
        load_config(tmp_path / "cycle.yaml")
    (tmp_path / "deep.yaml").write_text("x: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match=r"deep.yaml.*(nests|deep)"):
        load_config(tmp_path / "deep.yaml")


def test_yaml_alias_bomb_cli_one_line(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb(9))
    before = snapshot(tmp_path)
    result = brainforge("config", "validate", str(bomb), cwd=tmp_path, timeout=120)
    assert_one_line_error(result, "bomb.yaml:", "aliases")
    assert snapshot(tmp_path) == before


def test_config_with_a_few_anchors_still_loads(tmp_path, tiny_model_dir):
    from brainforge.config import load_config

    raw = yaml.safe_load(write_config(tmp_path / "c.yaml", tiny_model_dir).read_text())
    rest = yaml.safe_dump({k: v for k, v in raw.items() if k not in {"training", "data"}})
    anchored = tmp_path / "anchors.yaml"
    anchored.write_text(
        "x-common: &common {per_device_batch_size: 2, learning_rate: 0.001}\n".replace("x-common", "training")
        .replace("{", "{max_steps: 3, output_dir: " + json.dumps(str(tmp_path / "out")) + ", ", 1)
        + rest
        + "data:\n  max_seq_length: 192\n  system_prompt: &sp Be brief.\n"
        + "memory:\n  system_prompt: *sp\n  retrieval: {top_k: 2, recall_n: 4}\n  router: &router {knowledge_threshold: 0.5}\n")
    config = load_config(anchored)
    assert config.training.max_steps == 3 and config.training.per_device_batch_size == 2
    assert config.memory.system_prompt == "Be brief." == config.data.system_prompt


# ------------------------------------------------------------------------ config files and --set


def test_binary_and_latin1_configs_are_one_line_errors(tmp_path):
    binary = tmp_path / "model.bin.yaml"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("training:\n  max_steps: 3\n  test_prompts: ['Qu\u2019est-ce que', 'caf\xe9']\n".replace("\u2019", "'").encode("latin-1"))
    before = snapshot(tmp_path)
    assert_one_line_error(brainforge("config", "validate", str(binary)), "model.bin.yaml", "binary")
    assert_one_line_error(brainforge("config", "validate", str(latin1)), "latin1.yaml:3:", "UTF-8")
    assert snapshot(tmp_path) == before


def test_debug_still_shows_the_traceback(tmp_path):
    binary = tmp_path / "x.yaml"
    binary.write_bytes(b"\x00\x01\x02")
    result = brainforge("--debug", "config", "validate", str(binary))
    assert result.returncode != 0 and "Traceback" in result.stderr and "ConfigError" in result.stderr


def test_bad_set_overrides_are_one_line_errors(tmp_path, tiny_model_dir):
    config = write_config(tmp_path / "c.yaml", tiny_model_dir)
    before = snapshot(tmp_path)
    assert_one_line_error(brainforge("config", "validate", str(config), "--set", "training.max_steps=["),
                          "--set training.max_steps=[", "not valid YAML")
    # test_prompts is a list of strings in the file: item 0 is a string, it has no key x
    assert_one_line_error(brainforge("config", "validate", str(config), "--set", "training.test_prompts.0.x=1"),
                          "training.test_prompts.0", "no key 'x'")
    assert snapshot(tmp_path) == before


def test_set_override_edge_cases_in_process():
    from brainforge.config import apply_override

    raw = {"training": {"test_prompts": ["a"]}, "data": None}
    with pytest.raises(ConfigError, match="no list training.missing to index"):
        apply_override(raw, "training.missing.0=1")
    with pytest.raises(ConfigError, match="'3' is not an index of a list with 1 items"):
        apply_override(raw, "training.test_prompts.3=x")
    apply_override(raw, "data.max_seq_length=64")  # an empty section in the file is a section
    assert raw["data"] == {"max_seq_length": 64}


# ------------------------------------------------------------------------ adapters


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir, tokenizer) -> Path:
    """A real brainforge adapter folder on the tiny model (built in-process, no training)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from brainforge.training.checkpointing import write_adapter

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    folder = tmp_path_factory.mktemp("good-run") / "adapter"
    write_adapter(model, tokenizer, tokenizer.chat_template, folder, {"model": str(tiny_model_dir)})
    return folder


def damage(adapter_dir: Path, target: Path, how: str) -> Path:
    """A copy of the adapter folder damaged one way."""
    import shutil

    shutil.copytree(adapter_dir, target)
    weights = target / "adapter_model.safetensors"
    if how == "config-invalid-json":
        (target / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4,')
    elif how == "config-empty":
        (target / "adapter_config.json").write_text("{}")
    elif how == "meta-invalid-json":
        (target / "brainforge_adapter.json").write_text("{not json")
    elif how == "meta-empty":
        (target / "brainforge_adapter.json").write_text("{}")
    elif how == "truncated-weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "no-weights":
        weights.unlink()
    else:
        raise ValueError(how)
    return target


EXPECTED = {
    "config-invalid-json": ("adapter_config.json:1", "invalid JSON"),
    "config-empty": ("adapter_config.json", "peft_type"),
    "meta-invalid-json": ("brainforge_adapter.json:1", "invalid JSON"),
    "meta-empty": ("brainforge_adapter.json", "'model'"),
    "truncated-weights": ("adapter_model.safetensors", "truncated"),
    "no-weights": ("no adapter weights", "adapter_model.safetensors"),
}
# Would make any hub access visible: online mode, and an endpoint nothing listens on.
NETWORK_VISIBLE = {**ENV, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "1"}


@pytest.mark.parametrize("how", list(EXPECTED))
def test_damaged_adapter_in_process(adapter_dir, tmp_path, how):
    from brainforge.models.loader import adapter_base_model, check_adapter_folder

    broken = damage(adapter_dir, tmp_path / "adapter", how)
    with pytest.raises(ModelError) as caught:
        check_adapter_folder(broken)
        adapter_base_model(broken)
    message = str(caught.value)
    assert "\n" not in message
    for needle in EXPECTED[how]:
        assert needle in message, (needle, message)
    check_adapter_folder(adapter_dir)  # the intact one passes


@pytest.mark.parametrize("how", list(EXPECTED))
def test_generate_with_damaged_adapter_is_one_line(adapter_dir, tmp_path, how):
    broken = damage(adapter_dir, tmp_path / "adapter", how)
    before = snapshot(tmp_path)
    result = brainforge("generate", "--adapter", str(broken), "hi", "--max-new-tokens", "2", env=NETWORK_VISIBLE)
    assert_one_line_error(result, *EXPECTED[how])
    assert "127.0.0.1" not in result.stderr + result.stdout
    assert snapshot(tmp_path) == before


@pytest.mark.slow
@pytest.mark.parametrize(("command", "how"), [("chat", "truncated-weights"), ("merge", "no-weights"),
                                              ("eval", "config-empty"), ("train", "meta-empty")])
def test_other_commands_with_damaged_adapter_are_one_line(adapter_dir, tiny_model_dir, tmp_path, command, how):
    broken = damage(adapter_dir, tmp_path / "adapter", how)
    work = tmp_path / "work"
    work.mkdir()
    if command == "chat":
        args = ["chat", "--adapter", str(broken)]
    elif command == "merge":
        args = ["merge", str(broken), "--out", str(work / "merged")]
    elif command == "eval":
        grpo = work / "grpo.yaml"
        grpo.write_text(yaml.safe_dump({
            "model": {"name_or_path": str(tiny_model_dir)},
            "data": {"source": {"name": "reasoning_gym:basic_arithmetic", "type": "prompt", "options": {"size": 8}}},
            "algorithm": {"name": "grpo", "grpo": {"reward_functions": [{"name": "last_number"}]}},
            "training": {"max_steps": 1, "output_dir": str(work / "out")}}))
        args = ["eval", str(grpo), "--adapter", str(broken), "--k", "0", "--limit", "2"]
    else:
        config = write_config(work / "c.yaml", tiny_model_dir)
        data = yaml.safe_load(config.read_text())
        data["model"]["adapter_path"] = str(broken)
        config.write_text(yaml.safe_dump(data))
        args = ["train", str(config)]
    before = snapshot(tmp_path)
    result = brainforge(*args, cwd=work, env=NETWORK_VISIBLE, stdin="hello\n\n")
    assert_one_line_error(result, *EXPECTED[how])
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------ output_dir


@pytest.mark.slow
def test_output_dir_that_is_a_file_or_under_one_or_read_only(tmp_path, tiny_model_dir):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("keep me\n")
    before = snapshot(work)
    is_file = write_config(work / "file.yaml", tiny_model_dir)
    data = yaml.safe_load(is_file.read_text())
    data["training"]["output_dir"] = str(work / "notes.txt")
    is_file.write_text(yaml.safe_dump(data))
    under_file = work / "under.yaml"
    data["training"]["output_dir"] = str(work / "notes.txt" / "runs")
    under_file.write_text(yaml.safe_dump(data))
    before = snapshot(work)
    assert_one_line_error(brainforge("train", str(is_file), cwd=work), "training.output_dir", "notes.txt", "is a file")
    assert_one_line_error(brainforge("train", str(under_file), cwd=work), "training.output_dir", "notes.txt")
    assert_one_line_error(brainforge("config", "validate", str(under_file), cwd=work), "training.output_dir")
    assert snapshot(work) == before


def test_output_dir_not_writable(tmp_path, tiny_model_dir):
    """Tests run as root, for whom permission bits do not block writes: the test mounts a
    read-only tmpfs (root can), else uses /proc/sys (not writable even for root), and as an
    ordinary user a folder without write permission."""
    from brainforge.training.preflight import check_output_dir

    checked = 0
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ConfigError, match="training.output_dir: .*not writable"):
            check_output_dir(locked / "runs")
        checked += 1
    if not os.access("/proc/sys", os.W_OK):
        with pytest.raises(ConfigError, match="training.output_dir: .*not writable"):
            check_output_dir(Path("/proc/sys/brainforge-runs"))
        checked += 1
    mount_point = tmp_path / "ro"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount_point)],
                             capture_output=True).returncode == 0
    try:
        if mounted:
            with pytest.raises(ConfigError, match=r"training.output_dir: .*(read-only|not writable)"):
                check_output_dir(mount_point / "runs")
            config = write_config(tmp_path / "c.yaml", tiny_model_dir)
            data = yaml.safe_load(config.read_text())
            data["training"]["output_dir"] = str(mount_point / "runs")
            config.write_text(yaml.safe_dump(data))
            assert_one_line_error(brainforge("train", str(config)), "training.output_dir", str(mount_point))
            checked += 1
    finally:
        if mounted:
            subprocess.run(["umount", str(mount_point)], check=False)
    if not checked:
        pytest.skip("no unwritable folder available here (root, no mount, writable /proc/sys)")
    check_output_dir(tmp_path / "fine" / "runs")  # creatable: passes, and creates nothing
    assert not (tmp_path / "fine").exists()


# ------------------------------------------------------------------------ memory estimate


@pytest.mark.slow
def test_huge_lora_rank_on_default_model_is_refused_quickly_without_allocating(tmp_path):
    """r=100000 on the default model would allocate ~120 GB of adapter alone."""
    wrapper = tmp_path / "peak.py"
    wrapper.write_text("import resource, subprocess, sys\n"
                       "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
                       "sys.stdout.write(r.stdout); sys.stderr.write(r.stderr)\n"
                       "open(sys.argv[0] + '.rss', 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
                       "sys.exit(r.returncode)\n")
    for command in (["config", "validate"], ["train"]):
        started = time.perf_counter()
        result = subprocess.run([sys.executable, str(wrapper), sys.executable, "-m", "brainforge", *command,
                                 str(REPO / "configs" / "sft_demo.yaml"), "--set", "peft.lora.r=100000",
                                 "--set", f"training.output_dir={tmp_path / 'out'}"],
                                capture_output=True, text=True, timeout=300, env=ENV, cwd=tmp_path)
        seconds = time.perf_counter() - started
        line = assert_one_line_error(result, "cannot fit", "adapter", "peft.lora.r (now 100000)")
        assert "estimated peak memory" in line and "available RAM" in line
        peak_kb = int((tmp_path / "peak.py.rss").read_text())
        assert peak_kb < 2 * 1024 * 1024, peak_kb  # < 2 GB: nothing of the 120 GB was allocated
        assert seconds < 120, seconds
    assert not (tmp_path / "out").exists()


def test_config_validate_prints_the_estimate(tmp_path, tiny_model_dir):
    config = write_config(tmp_path / "c.yaml", tiny_model_dir)
    result = brainforge("config", "validate", str(config))
    assert result.returncode == 0, result.stderr[-2000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("estimated peak memory"))
    for term in ("weights", "adapter", "gradients", "optimizer", "activations", "available RAM"):
        assert term in line


def test_realistic_configs_fit_a_24_gb_machine():
    from brainforge.config import load_config
    from brainforge.training.estimate import check_memory

    from brainforge.config import has_reason_section, load_reason_config

    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert len(configs) >= 5
    runs = [(path, config) for path in configs
            for config in (load_reason_config(path).values() if has_reason_section(path) else [load_config(path)])]
    for path, config in runs:
        estimate = check_memory(config, available=24 * GIB)
        assert estimate is not None and estimate.fits, path
        assert estimate.peak > 1 * GIB, (path, estimate.summary())  # not trivially small either


def test_estimate_refusal_names_the_fix(tmp_path, tiny_model_dir):
    from brainforge.config import load_config
    from brainforge.training.estimate import check_memory

    config = load_config(write_config(tmp_path / "c.yaml", tiny_model_dir), ["training.per_device_batch_size=64",
                                                                             "data.max_seq_length=4096"])
    with pytest.raises(ConfigError) as caught:
        check_memory(config, available=GIB)
    message = str(caught.value)
    assert "activations" in message and "per_device_batch_size (now 64)" in message and "gradient_checkpointing" in message
    # gradient checkpointing keeps one tensor per layer: on the default model's 30 layers it saves most
    from brainforge.training.estimate import estimate_memory, model_shape

    shape = model_shape("default")
    full = estimate_memory(load_config(REPO / "configs" / "sft_demo.yaml"), shape, 4).terms["activations"]
    checkpointed = estimate_memory(load_config(REPO / "configs" / "sft_demo.yaml", ["training.gradient_checkpointing=true"]),
                                   shape, 4).terms["activations"]
    assert checkpointed < full / 2


MEASURE = r"""
import json, resource, sys
import psutil, torch
torch.set_num_threads(1)
from transformers import LlamaConfig, LlamaForCausalLM
from brainforge.config import LoraSettings
from brainforge.models.loader import attach_lora
from brainforge.training.losses import sum_token_nll

hidden, inter, layers, vocab, batch, seq, r = map(int, sys.argv[1:8])
cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True)
torch.manual_seed(0)
base = LlamaForCausalLM(cfg)
base.train()
model = attach_lora(base, LoraSettings(r=r, lora_alpha=2 * r))
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
ids = torch.randint(0, vocab, (batch, seq))
before = psutil.Process().memory_info().rss
nll, count = sum_token_nll(model, {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)})
(nll / count).backward()
optimizer.step()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"step_bytes": peak - before}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("dims", [(256, 512, 4, 49152, 4, 256, 8),    # output head dominates
                                  (512, 2048, 8, 2048, 4, 256, 8)])  # decoder layers dominate
def test_estimate_matches_measured_peak_of_a_real_training_step(tmp_path, dims):
    """The step's own memory (activations, logits, adapter gradients and optimizer state)
    against the estimate of those terms: within 0.5x-2x."""
    from brainforge.config import BrainforgeConfig
    from brainforge.training.estimate import ModelShape, estimate_memory

    hidden, inter, layers, vocab, batch, seq, r = dims
    script = tmp_path / "measure.py"
    script.write_text(MEASURE)
    result = subprocess.run([sys.executable, str(script), *map(str, dims)], capture_output=True, text=True,
                            timeout=600, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])["step_bytes"]
    shape = ModelShape("test", vocab, hidden, inter, layers, heads=4, kv_heads=2, head_dim=hidden // 4, tied_embeddings=True)
    config = BrainforgeConfig.model_validate({
        "data": {"source": {"name": "sample:chat"}, "max_seq_length": seq},
        "training": {"max_steps": 1, "per_device_batch_size": batch},
        "peft": {"lora": {"r": r, "lora_alpha": 2 * r}},
    })
    terms = estimate_memory(config, shape, weight_bytes=4).terms
    estimated = terms["activations"] + terms["gradients"] + terms["optimizer"]
    assert 0.5 <= measured / estimated <= 2.0, (measured, estimated, terms)


# ------------------------------------------------------------------------ SOPs: hangs


VALID_SOP = {"name": "ok-sop", "description": "A fine procedure.", "steps": [{"action": "Do it."}]}


def test_sop_validate_skips_a_fifo_instead_of_hanging(tmp_path):
    folder = tmp_path / "sops"
    folder.mkdir()
    (folder / "ok.yaml").write_text(yaml.safe_dump(VALID_SOP))
    os.mkfifo(folder / "x.yaml")
    only_fifo = tmp_path / "fifo-only"
    only_fifo.mkdir()
    os.mkfifo(only_fifo / "x.yaml")
    result = brainforge("sop", "validate", str(folder), timeout=120)  # the old code blocked forever on the read
    assert result.returncode == 0, result.stderr[-2000:]
    assert "skipped" in result.stdout and "x.yaml" in result.stdout and "FIFO" in result.stdout
    assert "ok: ok-sop" in result.stdout
    assert_one_line_error(brainforge("sop", "validate", str(only_fifo), timeout=120), "no SOP files", "fifo-only")
    assert_one_line_error(brainforge("sop", "validate", str(only_fifo / "x.yaml"), timeout=120), "x.yaml", "FIFO")


def test_sop_pattern_with_catastrophic_backtracking_is_bounded(tmp_path):
    from brainforge.memory.sop import SOP, SOPManager

    evil = SOP.model_validate({**VALID_SOP, "name": "evil", "triggers": {"patterns": [r"(a+)+$"], "keywords": ["aaa"]}})
    manager = SOPManager([evil])
    query = "a" * 5000 + "!"  # with `re`: 2**5000 paths; 30 characters already take a minute
    started = time.perf_counter()
    match = manager.match(query)[0]
    assert time.perf_counter() - started < 10
    assert match.lexical == 0.0 and any("timed out" in reason for reason in match.reasons)
    assert manager.match("aaaa")[0].lexical == 1.0  # the pattern still works where it can


@pytest.mark.slow
def test_sop_match_cli_with_catastrophic_pattern_returns(tmp_path):
    pytest.importorskip("sentence_transformers")
    sop_file = tmp_path / "evil.yaml"
    sop_file.write_text(yaml.safe_dump({**VALID_SOP, "name": "evil", "triggers": {"patterns": [r"(a+)+$"]}}))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"memory": {"sops": [str(sop_file)], "builtin_sops": False}}))
    started = time.perf_counter()
    result = brainforge("sop", "match", "a" * 3000 + "!", "--config", str(config), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "timed out" in result.stdout and "selected:" in result.stdout
    assert time.perf_counter() - started < 300


# ------------------------------------------------------------------------ training data


@pytest.mark.parametrize("response", [["first", "second"], {"text": "x"}, 42, True])
def test_response_that_is_not_text_names_file_and_line(tmp_path, response):
    from brainforge.config import SourceConfig
    from brainforge.data.sources import load_source

    data = tmp_path / "train.jsonl"
    rows = [{"prompt": "p1", "response": "fine"}, {"prompt": "p2", "response": response}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl:2: field 'response' must be text, got " + type(response).__name__):
        load_source(SourceConfig(path=str(data), type="chat"), None)
    # every row a list: the column loads as a list column, and is refused the same way
    data.write_text("\n".join(json.dumps({"prompt": f"p{i}", "response": ["a", "b"]}) for i in range(3)) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl:1: field 'response' must be text"):
        load_source(SourceConfig(path=str(data), type="chat"), None)


def test_numbers_from_csv_are_still_text(tmp_path):
    from brainforge.config import SourceConfig
    from brainforge.data.sources import load_source

    data = tmp_path / "train.csv"
    data.write_text("instruction,output\nWhat is 2+2?,4\nWhat is 3+3?,6\n")
    loaded = load_source(SourceConfig(path=str(data), type="language"), None)
    assert loaded[0]["messages"][-1] == {"role": "assistant", "content": "4"}


def test_bad_role_names_file_and_row(tmp_path):
    from brainforge.config import SourceConfig
    from brainforge.data.sources import load_source

    data = tmp_path / "chat.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]}
    data.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=r"chat.jsonl:3: messages\[1\] has role 'bot'; expected one of system, user, assistant"):
        load_source(SourceConfig(path=str(data), type="chat"), None)
    # rows that are not JSONL (a parquet/json file) are named by row
    data = tmp_path / "chat.json"
    data.write_text(json.dumps([good, bad]))
    with pytest.raises(DataError, match=r"chat.json, row 1 \(item 2\).*role 'bot'"):
        load_source(SourceConfig(path=str(data), type="chat"), None)


def test_data_preview_with_list_response_is_one_line(tmp_path, tiny_model_dir):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "p", "response": ["a", "b"]}) + "\n")
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, datasets={"multi_source_enabled": False},
                          data={"source": {"path": str(data), "type": "chat"}})
    before = snapshot(tmp_path)
    assert_one_line_error(brainforge("data", "preview", str(config)), "train.jsonl:1", "'response' must be text")
    assert snapshot(tmp_path) == before
