from pathlib import Path

import pytest

from brainforge.config import BrainforgeConfig, apply_override, load_config, validate_config
from brainforge.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
MINIMAL = {"data": {"source": {"name": "sample:chat"}}, "training": {"max_steps": 3}}


def test_minimal_config_fills_defaults():
    config = validate_config(MINIMAL)
    assert config.model.name_or_path == "default"
    assert config.peft.lora.target_modules == "all-linear"
    assert config.sources()[0].name == "sample:chat"


def test_unknown_key_names_path_and_suggests_fix():
    with pytest.raises(ConfigError) as err:
        validate_config({**MINIMAL, "training": {"max_steps": 3, "learning_rat": 1e-4}})
    message = str(err.value)
    assert "training.learning_rat: unknown key" in message
    assert "did you mean 'learning_rate'" in message


def test_unknown_nested_key_in_list():
    with pytest.raises(ConfigError, match=r"datasets.sources.0.wieght: unknown key; did you mean 'weight'"):
        validate_config({**MINIMAL, "datasets": {"multi_source_enabled": True, "sources": [{"name": "sample:chat", "wieght": 1}]}})


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError) as err:
        validate_config({**MINIMAL, "peft": {"lora": {"r": "sixteen"}}})
    assert "peft.lora.r" in str(err.value) and "'sixteen'" in str(err.value)


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ({"training": {"max_steps": 3}}, "data.source: no dataset given"),
        ({"data": {"source": {"name": "sample:chat"}}}, "set training.max_steps or training.num_epochs"),
        ({**MINIMAL, "training": {"max_steps": 3, "warmup_steps": 2, "warmup_ratio": 0.1}}, "not both"),
        ({**MINIMAL, "datasets": {"multi_source_enabled": True}}, "no sources are listed"),
        ({**MINIMAL, "training": {"max_steps": 3, "precision": "fp16"}, "hardware": {"accelerator": "cpu"}}, "fp16 is not supported on CPU"),
        ({**MINIMAL, "hardware": {"num_nodes": 2}}, "multi-node runs need an explicit strategy"),
        ({"data": {"source": {"name": "sample:chat", "path": "x.jsonl"}}, "training": {"max_steps": 1}}, "exactly one of 'name'"),
        ({"data": {"source": {"name": "sample:chat", "weight": 0}}, "training": {"max_steps": 1}}, "weight must be > 0"),
        ({**MINIMAL, "training": {"max_steps": 0}}, "training.max_steps"),
        ({**MINIMAL, "hardware": {"devices": 0}}, "hardware.devices"),
    ],
)
def test_impossible_values_and_combinations(raw, fragment):
    with pytest.raises(ConfigError, match=None) as err:
        validate_config(raw)
    assert fragment in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_syntax_error_reports_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("training:\n  max_steps: 3\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+:\d+: invalid YAML"):
        load_config(path)


def test_overrides_parse_yaml_values_and_list_indices(tmp_path):
    raw = {"datasets": {"sources": [{"name": "a", "weight": 1}]}}
    apply_override(raw, "training.max_steps=20")
    apply_override(raw, "datasets.sources.0.weight=0.5")
    apply_override(raw, "peft.lora.target_modules=[q_proj, v_proj]")
    assert raw["training"]["max_steps"] == 20
    assert raw["datasets"]["sources"][0]["weight"] == 0.5
    assert raw["peft"]["lora"]["target_modules"] == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match="not an index"):
        apply_override(raw, "datasets.sources.3.weight=1")
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_override(raw, "no_equals_sign")


def test_relative_data_paths_resolve_from_config_file(tmp_path):
    (tmp_path / "d.jsonl").write_text("")
    path = tmp_path / "c.yaml"
    path.write_text("data: {source: {path: d.jsonl}}\ntraining: {max_steps: 1}\n")
    assert load_config(path).sources()[0].path == str((tmp_path / "d.jsonl").resolve())


def test_every_shipped_config_validates():
    configs = sorted((REPO / "configs").rglob("*.yaml"))
    assert configs, "no configs found"
    from brainforge.config import has_reason_section, load_reason_config

    for path in configs:
        if has_reason_section(path):  # a `brainforge reason` config: each phase validates
            assert all(isinstance(c, BrainforgeConfig) for c in load_reason_config(path).values()), path
            continue
        assert isinstance(load_config(path), BrainforgeConfig), path


def test_prompt_sources_are_for_rl_only():
    with pytest.raises(ConfigError, match="'prompt' sources have no answers to imitate"):
        validate_config({"data": {"source": {"name": "reasoning_gym:basic_arithmetic", "type": "prompt"}}, "training": {"max_steps": 1}})
    config = validate_config({"data": {"source": {"name": "reasoning_gym:basic_arithmetic", "type": "prompt"}},
                              "training": {"max_steps": 1}, "algorithm": {"name": "grpo"}})
    assert config.algorithm.grpo.num_generations == 4
