import json

import pytest

from brainforge.config import SourceConfig, validate_config
from brainforge.data.module import prepare_sft_data
from brainforge.data.preview import preview
from brainforge.data.sources import load_source, mix_sources
from brainforge.errors import DataError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def qa_rows(n, tag):
    return [{"prompt": f"{tag} question {i}", "response": f"{tag} answer {i}"} for i in range(n)]


def test_mixing_follows_weights_and_is_seeded(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", qa_rows(400, "A"))
    b = write_jsonl(tmp_path / "b.jsonl", qa_rows(400, "B"))
    sources = [SourceConfig(path=str(a), weight=3.0), SourceConfig(path=str(b), weight=1.0)]
    mixed = mix_sources(sources, None, seed=1, stopping_strategy="first_exhausted")
    share_a = sum(1 for s in mixed["source"] if s == str(a)) / len(mixed)
    assert 0.70 <= share_a <= 0.80
    again = mix_sources(sources, None, seed=1, stopping_strategy="first_exhausted")
    assert again["messages"] == mixed["messages"]
    other = mix_sources(sources, None, seed=2, stopping_strategy="first_exhausted")
    assert other["messages"] != mixed["messages"]


def test_max_samples_and_csv_parquet(tmp_path):
    import pandas as pd

    frame = pd.DataFrame(qa_rows(10, "C"))
    frame.to_csv(tmp_path / "c.csv", index=False)
    frame.to_parquet(tmp_path / "c.parquet")
    assert len(load_source(SourceConfig(path=str(tmp_path / "c.csv"), max_samples=3), None)) == 3
    assert len(load_source(SourceConfig(path=str(tmp_path / "c.parquet")), None)) == 10


def test_column_mapping_and_bundled_types():
    coding = load_source(SourceConfig(name="sample:coding", type="coding", max_samples=2), "be brief")
    messages = coding[0]["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[2]["content"].startswith("```python")
    calls = load_source(SourceConfig(name="sample:function_calling", type="function_calling", max_samples=1), None)
    reply = calls[0]["messages"][-1]["content"]
    assert reply.startswith("<function_call>") and json.loads(reply[len("<function_call>") : -len("</function_call>")])["name"]


def test_renamed_columns(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"q": "hi", "a": "hello"}])
    rows = load_source(SourceConfig(path=str(path), columns={"prompt": "q", "response": "a"}), None)
    assert rows[0]["messages"][-1] == {"role": "assistant", "content": "hello"}


def test_missing_column_is_named(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "hi", "answer": "hello"}])
    with pytest.raises(DataError, match=r"x.jsonl: missing column\(s\) instruction"):
        load_source(SourceConfig(path=str(path), type="coding"), None)
    with pytest.raises(DataError, match="unknown field"):
        load_source(SourceConfig(path=str(path), type="coding", columns={"nope": "q"}), None)


def test_missing_file_and_bad_json_line(tmp_path):
    with pytest.raises(DataError, match="dataset file not found"):
        load_source(SourceConfig(path=str(tmp_path / "missing.jsonl")), None)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        load_source(SourceConfig(path=str(bad)), None)
    with pytest.raises(DataError, match="unsupported file type"):
        (tmp_path / "x.txt").write_text("hi")
        load_source(SourceConfig(path=str(tmp_path / "x.txt")), None)


def test_empty_after_filtering(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "hi", "response": "   "}])
    with pytest.raises(DataError, match="no usable rows"):
        load_source(SourceConfig(path=str(path)), None)


def test_unknown_sample_set():
    with pytest.raises(DataError, match="available: sample:chat"):
        load_source(SourceConfig(name="sample:poetry"), None)


def test_hub_dataset_offline_is_a_clear_error():
    with pytest.raises(DataError, match="could not load this hub dataset"):
        load_source(SourceConfig(name="someone/some-dataset-that-is-not-here"), None)


def config_for(path, **data):
    return validate_config({"data": {"source": {"path": str(path)}, **data}, "training": {"max_steps": 1}})


def test_prepare_fails_when_nothing_is_trained(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "word " * 200, "response": "answer"}] * 3)
    with pytest.raises(DataError, match="no training example has a trained token"):
        prepare_sft_data(config_for(path, max_seq_length=64, val_split=0.0), tokenizer)


def test_preview_marks_trained_tokens_and_fails_loudly(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "x.jsonl", qa_rows(3, "P"))
    shown = preview(config_for(path), tokenizer, count=2)
    assert len(shown) == 2 and "⟦P answer" in shown[0].marked_text and shown[0].marked_text.endswith("<|im_end|>⟧\n")
    # Cut just after the answer starts: tokens are trained but never the end-of-turn.
    long_answer = write_jsonl(tmp_path / "y.jsonl", [{"prompt": "q", "response": "long " * 100}])
    with pytest.raises(DataError, match="never trains the end-of-turn token"):
        preview(config_for(long_answer, max_seq_length=60), tokenizer)
    with pytest.raises(DataError, match="trains no token"):
        preview(config_for(long_answer, max_seq_length=20), tokenizer)
