"""search_r1 end to end on the tiny model and a real store (ChromaDB + BM25, the default
embedder): it trains with both cold starts, logs each reward component and the search
figures, and a missing or empty store stops it before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from test_luffy_exgrpo_runs import brainforge, scalars

COUNTRIES = {
    "bhutan": ("Thimphu", "975"), "nepal": ("Kathmandu", "977"), "chile": ("Santiago", "56"), "fiji": ("Suva", "679"),
}


@pytest.fixture(scope="module")
def country_store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("search_store")
    docs = root / "docs"
    docs.mkdir()
    for name, (capital, code) in COUNTRIES.items():
        (docs / f"{name}.md").write_text(f"# {name.title()}\n\n{name.title()} is a country. Its capital is {capital}. "
                                         f"The international calling code of {name.title()} is {code}.\n")
    result = brainforge("ingest", str(docs), "--store", str(root / "store"))
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "store"


def search_config(tmp_path, model_dir, store, search=None, **training):
    prompts = tmp_path / "qa.jsonl"
    rows = [{"question": f"What is the capital of {name.title()}?", "answer": [capital]} for name, (capital, _) in COUNTRIES.items()]
    rows += [{"question": f"What is the international calling code of {name.title()}?", "answer": [code, f"+{code}"]}
             for name, (_, code) in COUNTRIES.items()]
    prompts.write_text("".join(json.dumps({"prompt": r["question"], **r}) + "\n" for r in rows))
    config = {
        "model": {"name_or_path": str(model_dir)},
        "peft": {"lora": {"r": 4, "lora_alpha": 8}},
        "data": {"source": {"path": str(prompts), "type": "prompt"}},
        "memory": {"store": str(store)},
        "algorithm": {"name": "search_r1",
                      "grpo": {"num_generations": 3, "prompts_per_step": 2, "micro_batch_size": 3, "temperature": 1.0, "beta": 0.01},
                      "search": {"max_turn_tokens": 12, "max_total_tokens": 160, "max_search_calls": 2, **(search or {})}},
        "training": {"output_dir": str(tmp_path / "outputs"), "max_steps": 2, "learning_rate": 1e-2,
                     "save_every_n_steps": 10, "test_prompts": [], **training},
    }
    path = tmp_path / "search_r1.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def only_run(tmp_path):
    (run,) = list((tmp_path / "outputs").iterdir())
    return run


def test_search_r1_with_luffy_cold_start_trains_and_logs_every_component(tmp_path, tiny_model_dir, country_store):
    config = search_config(tmp_path, tiny_model_dir, country_store, search={"cold_start": "luffy"},
                           test_prompts=["What is the capital of Fiji?"])
    result = brainforge("train", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    run = only_run(tmp_path)
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    (sample,) = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert sample["prompt"] == "What is the capital of Fiji?" and "searches" in sample and "answer" in sample  # answered by search rollouts
    found = scalars(run)
    for tag in ("reward/answer_match/mean", "reward/tag_order/mean", "reward/search_bonus/mean", "search/calls_mean",
                "search/answer_rate", "search/invalid_actions_mean", "completion/observation_tokens_mean", "off_policy/samples"):
        assert tag in found, tag
    assert found["off_policy/samples"] == [2.0, 2.0]        # a search trace in each group: the store holds every answer
    assert found["reward/off_policy_mean"] == [1.0, 1.0]    # and it earns 0.7 + 0.2 + 0.1
    assert found["search/traces_found_frac"][-1] == 1.0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert [r["name"] for r in saved["algorithm"]["grpo"]["reward_functions"]] == ["answer_match", "tag_order", "search_bonus"]


def test_search_r1_with_sft_cold_start_warms_up_then_trains(tmp_path, tiny_model_dir, country_store):
    config = search_config(tmp_path, tiny_model_dir, country_store, search={"cold_start": "sft", "warmup_steps": 1})
    result = brainforge("train", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    found = scalars(only_run(tmp_path))
    assert len(found["warmup/nll"]) == 1 and found["warmup/nll"][0] > 0
    assert len(found["reward/answer_match/mean"]) == 1      # step 2 was RL
    assert "off_policy/samples" not in found                 # no trace slots after the warm-up


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_search_r1_without_a_store_fails_before_the_model_loads(tmp_path, kind):
    store = tmp_path / "store"
    if kind == "empty":
        result = brainforge("ingest", str(tmp_path / "nothing"), "--store", str(store))
        (tmp_path / "nothing").mkdir()
        result = brainforge("ingest", str(tmp_path / "nothing"), "--store", str(store))
    config = search_config(tmp_path, tmp_path / "no-such-model", store)
    result = brainforge("train", str(config))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "brainforge ingest" in result.stderr and str(store) in result.stderr
    assert "Traceback" not in result.stderr and "no-such-model" not in result.stderr
