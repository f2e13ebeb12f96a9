"""The Search-R1 QA task: country questions split by country, their documents, the NQ-style
JSONL loader and `brainforge qa countries`. No model is loaded."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from brainforge.config import SourceConfig, load_config
from brainforge.data.prompts import load_prompts
from brainforge.data.qa import (
    KINDS,
    MAX_DOCUMENT_WORDS,
    Country,
    _country,
    country_documents,
    country_qa,
    country_questions,
    load_countries,
    read_qa_jsonl,
    slug,
    split_countries,
)
from brainforge.errors import BrainforgeError, DataError, MissingDependencyError

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def countries() -> list[Country]:
    return load_countries()


def _says(text: str, answer: str) -> bool:
    """`answer` occurs in `text` as whole words (case-insensitive): `.bt` in "is .bt.", not `Niger` in "Nigeria"."""
    return re.search(rf"(?<!\w){re.escape(answer.casefold())}(?!\w)", text.casefold()) is not None


# ------------------------------------------------------------------------------ countries


def test_the_package_data_gives_hundreds_of_countries_and_every_kind(countries):
    assert len(countries) > 200 and len({c.name for c in countries}) == len(countries)  # Curaçao is shipped twice
    questions = [q for country in countries for q in country_questions(country)]
    for kind in KINDS:
        assert sum(q.kind == kind for q in questions) > 150, kind
    bhutan = {q.kind: q for q in country_questions(next(c for c in countries if c.name == "Bhutan"))}
    assert bhutan["capital"].question == "What is the capital of Bhutan?" and bhutan["capital"].answers == ("Thimphu",)
    assert bhutan["calling_code"].answers == ("975", "+975") and bhutan["tld"].answers == (".bt",)
    assert set(bhutan["currency"].answers) == {"BTN", "INR"} and bhutan["subregion"].answers == ("Southern Asia",)


@pytest.mark.parametrize("seed", [0, 1, 7, 12345])
@pytest.mark.parametrize("eval_size", [1, 40, 120])
def test_split_by_country_never_puts_a_held_out_country_in_training(countries, seed, eval_size):
    task = country_qa(seed=seed, eval_size=eval_size, countries=countries)
    train_countries = {q.country for q in task.train}
    test_countries = {q.country for q in task.test}
    assert len(task.held_out) == eval_size and test_countries == set(task.held_out)
    assert not train_countries & test_countries
    assert not {q.question for q in task.train} & {q.question for q in task.test}
    # Every country with a question is on exactly one side.
    assert train_countries | test_countries == {c.name for c in countries if country_questions(c)}
    again = country_qa(seed=seed, eval_size=eval_size, countries=countries)
    assert again.train == task.train and again.test == task.test  # deterministic, order included


def test_held_out_countries_depend_on_the_seed_not_on_the_kinds(countries):
    all_kinds = country_qa(seed=3, eval_size=40, countries=countries)
    capitals = country_qa(seed=3, eval_size=40, kinds=["capital"], countries=countries)
    assert capitals.held_out == all_kinds.held_out and {q.kind for q in capitals.train + capitals.test} == {"capital"}
    assert country_qa(seed=4, eval_size=40, countries=countries).held_out != all_kinds.held_out
    assert len(country_qa(seed=3, eval_size=40, size=25, countries=countries).train) == 25


def test_every_question_has_golds_and_its_document_contains_one(countries):
    documents = country_documents(countries)
    by_country = {text.split("\n", 1)[0].removeprefix("# "): text for text in documents.values()}
    questions = [q for country in countries for q in country_questions(country)]
    assert questions
    for q in questions:
        assert q.answers and all(isinstance(a, str) and a.strip() == a and a for a in q.answers), q
        assert q.country in q.question and q.question.endswith("?")
        # Retrieval can answer it: the country's own document states a gold answer ...
        assert any(_says(by_country[q.country], a) for a in q.answers), q
        # ... and the question does not give it away.
        assert not any(_says(q.question, a) for a in q.answers), q


def test_documents_are_short_markdown_with_unique_safe_names(countries):
    documents = country_documents(countries)
    assert len(documents) >= len(countries) - 2  # only a country without any fact has no file
    for filename, text in documents.items():
        assert filename == f"{filename[:-3]}.md" and filename[:-3].replace("_", "").replace("-", "").isalnum(), filename
        assert filename.isascii() and text.startswith("# ") and text.endswith("\n")
        assert len(text.split()) <= MAX_DOCUMENT_WORDS + 10, filename  # heading + body, well under ~120 words
    bhutan = documents["bhutan.md"]
    assert bhutan.startswith("# Bhutan\n\n") and "Thimphu" in bhutan and "+975" in bhutan and ".bt" in bhutan
    assert "Bhutan borders China and India." in bhutan  # neighbours by name, not ISO code
    # A long entry loses neighbours and provinces (asked by no question), never an answer.
    congo = documents["democratic_republic_of_the_congo.md"]
    assert "Kinshasa" in congo and "+243" in congo and "CDF" in congo and len(congo.split()) <= MAX_DOCUMENT_WORDS + 10


def test_slug_and_duplicate_names():
    assert slug("Côte d'Ivoire") == "cote_d_ivoire" and slug("Åland Islands") == "aland_islands" and slug("???") == "country"
    twins = [Country("Curaçao", capitals=("Willemstad",)), Country("Curacao", capitals=("Willemstad",))]
    assert sorted(country_documents(twins)) == ["curacao-2.md", "curacao.md"]


def test_missing_or_malformed_fields_are_skipped_not_asked():
    raw = {"name": "Nowhere", "capital": "", "callingCodes": [""], "currencies": None, "tld": ["الجزائر."],
           "demonym": "Antiguan,Barbudan", "subregion": "Western Asia", "region": "Asia", "borders": ["ABC"],
           "population": "many", "area": True, "provinces": [None, "North"]}
    country = _country(raw, {"ABC": "Abcland"})
    assert country.capitals == () and country.calling_codes == () and country.tlds == () and country.currencies == ()
    assert country.population is None and country.area is None and country.provinces == ("North",)
    questions = {q.kind: q for q in country_questions(country)}
    assert set(questions) == {"subregion", "demonym"} and questions["demonym"].answers == ("Antiguan", "Barbudan")
    text = country_documents([country])["nowhere.md"]
    assert "capital" not in text and "Nowhere borders Abcland." in text and "Antiguan or Barbudan" in text
    assert country_documents([Country("Empty")]) == {}


def test_a_question_whose_answer_is_in_it_is_dropped():
    singapore = Country("Singapore", capitals=("Singapore",), calling_codes=("65",))
    assert [q.kind for q in country_questions(singapore)] == ["calling_code"]
    mexico = Country("Mexico", capitals=("Mexico City",))
    assert [q.answers for q in country_questions(mexico)] == [("Mexico City",)]
    # The domain `.is` is not the word "is" of the question.
    iceland = Country("Iceland", tlds=(".is",))
    assert [q.question for q in country_questions(iceland)] == ["What is the top-level internet domain of Iceland?"]
    saint_pierre = Country("Saint Pierre and Miquelon", capitals=("Saint-Pierre",))
    assert country_questions(saint_pierre) == []


def test_without_countryinfo_the_error_names_the_extra(monkeypatch):
    import brainforge.data.qa as qa

    qa._read_countries.cache_clear()
    monkeypatch.setattr(qa.importlib.util, "find_spec", lambda name: None)
    try:
        with pytest.raises(MissingDependencyError, match=r"countryinfo.*brainforge\[reasoning\]"):
            load_countries()
    finally:
        monkeypatch.undo()
        qa._read_countries.cache_clear()


def test_split_rejects_an_eval_size_that_leaves_no_training_country(countries):
    with pytest.raises(DataError, match="options.eval_size"):
        split_countries(countries, len(countries), 0)


# ------------------------------------------------------------------------------ prompt sources


def test_load_prompts_qa_countries_gives_bare_questions_and_gold_columns():
    source = SourceConfig(name="qa:countries", type="prompt", options={"seed": 2, "eval_size": 10, "kinds": ["capital", "tld"]})
    train = load_prompts([source], None)
    test = load_prompts([source], None, split="test")
    assert {p.columns["kind"] for p in train + test} == {"capital", "tld"}
    assert len({p.columns["country"] for p in test}) == 10
    assert not {p.columns["country"] for p in train} & {p.columns["country"] for p in test}
    example = test[0]
    assert example.messages == [{"role": "user", "content": example.columns["question"]}]
    assert isinstance(example.columns["answer"], list) and example.columns["answer"]
    capped = load_prompts([SourceConfig(name="qa:countries", type="prompt", options={"size": "7"})], None)
    assert len(capped) == 7


@pytest.mark.parametrize(("options", "message"), [
    ({"kinds": ["capital", "flag"]}, "options.kinds has unknown kind"),
    ({"kinds": 3}, "options.kinds must be a list"),
    ({"size": 0}, "options.size"),
    ({"eval_size": "lots"}, "options.eval_size must be a whole number"),
    ({"seeds": 1}, "unknown option"),
])
def test_qa_countries_bad_options_are_named(options, message):
    with pytest.raises(DataError, match=message):
        load_prompts([SourceConfig(name="qa:countries", type="prompt", options=options)], None)


def _write(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_qa_jsonl_reads_nq_and_hotpotqa_layouts(tmp_path):
    path = _write(
        tmp_path / "nq.jsonl",
        json.dumps({"id": "n1", "question": "who wrote hamlet", "golden_answers": ["William Shakespeare", "Shakespeare"]}),
        "",
        json.dumps({"query": "capital of peru", "answers": "Lima"}),
        json.dumps({"question": "year of the moon landing?", "answer": [1969, " 1969 "], "type": "comparison"}),
        json.dumps({"question": "squad style", "answers": {"text": ["x", "y"], "answer_start": [0, 3]}}),
    )
    items = read_qa_jsonl(path)
    assert [(i.question, i.answers, i.kind) for i in items] == [
        ("who wrote hamlet", ("William Shakespeare", "Shakespeare"), "qa"),
        ("capital of peru", ("Lima",), "qa"),
        ("year of the moon landing?", ("1969",), "comparison"),
        ("squad style", ("x", "y"), "qa"),
    ]
    prompts = load_prompts([SourceConfig(name="qa:jsonl", path=str(path), type="prompt")], None)
    assert prompts[1].messages == [{"role": "user", "content": "capital of peru"}] and prompts[1].columns["answer"] == ["Lima"]


@pytest.mark.parametrize(("line", "message"), [
    ('{"question": "q", "golden_answers": []}', "missing gold answers"),
    ('{"question": "q", "answer": "  "}', "missing gold answers"),
    ('{"question": "q"}', "missing gold answers .no 'golden_answers'"),
    ('{"question": "q", "answers": [null]}', "missing gold answers"),
    ('{"question": "", "answer": "a"}', "no question"),
    ('{"question": "q", "answer": "a"', "invalid JSON"),
    ('["q", "a"]', "must be a JSON object"),
])
def test_qa_jsonl_bad_line_names_file_and_line(tmp_path, line, message):
    path = _write(tmp_path / "bad.jsonl", '{"question": "fine", "answer": "yes"}', "", line)
    with pytest.raises(DataError, match=message) as caught:
        read_qa_jsonl(path)
    assert str(caught.value).startswith(f"{path}:3: ")  # 1-based, the blank line 2 counted as a line, not as an error


def test_qa_jsonl_test_split_needs_test_path(tmp_path):
    train = _write(tmp_path / "train.jsonl", '{"question": "q", "answer": "a"}')
    source = SourceConfig(name="qa:jsonl", path=str(train), type="prompt")
    with pytest.raises(DataError, match="options.test_path"):
        load_prompts([source], None, split="test")
    with pytest.raises(DataError, match="not found"):
        load_prompts([SourceConfig(name="qa:jsonl", path=str(tmp_path / "nope.jsonl"), type="prompt")], None)
    with pytest.raises(DataError, match="unknown option"):
        load_prompts([SourceConfig(name="qa:jsonl", path=str(train), type="prompt", options={"tset_path": "x"})], None)


def test_qa_jsonl_paths_in_a_config_resolve_from_the_config_file(tmp_path):
    folder = tmp_path / "task"
    folder.mkdir()
    _write(folder / "train.jsonl", '{"question": "train q", "answer": "a"}')
    _write(folder / "test.jsonl", '{"question": "test q", "golden_answers": ["b"]}')
    config_path = folder / "qa.yaml"
    config_path.write_text(yaml.safe_dump({
        "data": {"source": {"name": "qa:jsonl", "path": "train.jsonl", "type": "prompt", "options": {"test_path": "test.jsonl"}}},
        "training": {"max_steps": 1}, "algorithm": {"name": "grpo"},
    }))
    config = load_config(config_path)
    assert [p.text for p in load_prompts(config.sources(), None)] == ["train q"]
    assert [p.columns["answer"] for p in load_prompts(config.sources(), None, split="test")] == [["b"]]
    with pytest.raises(ValueError, match="exactly one of"):
        SourceConfig(name="sample:chat", path=str(folder / "train.jsonl"))  # only qa:jsonl takes both


# ------------------------------------------------------------------------------ CLI


def test_cli_writes_the_task_and_refuses_a_foreign_folder(tmp_path):
    from typer.testing import CliRunner

    from brainforge.cli import app

    out = tmp_path / "countries"
    runner = CliRunner()
    result = runner.invoke(app, ["qa", "countries", str(out), "--seed", "5", "--eval-size", "12"])
    assert result.exit_code == 0, result.output
    docs = sorted((out / "docs").glob("*.md"))
    train = [json.loads(line) for line in (out / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    test = [json.loads(line) for line in (out / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(docs) > 200 and (out / "docs" / "bhutan.md").is_file()
    assert len({row["country"] for row in test}) == 12 and not {r["country"] for r in train} & {r["country"] for r in test}
    assert set(test[0]) == {"question", "answer", "kind", "country"} and isinstance(test[0]["answer"], list)
    assert f"{len(train)} training questions" in result.output and f"{len(test)} held-out questions (12 countries)" in result.output
    assert f"brainforge ingest {out / 'docs'} --config CONFIG" in result.output
    # The written files load back through qa:jsonl.
    assert len(read_qa_jsonl(out / "test.jsonl")) == len(test)

    # Running again (another seed) rewrites its own files and leaves a user's file alone.
    (out / "docs" / "my_notes.md").write_text("mine")
    again = runner.invoke(app, ["qa", "countries", str(out), "--seed", "6", "--eval-size", "12"])
    assert again.exit_code == 0, again.output
    assert (out / "docs" / "my_notes.md").read_text() == "mine"
    assert {json.loads(line)["country"] for line in (out / "test.jsonl").read_text().splitlines()} != {r["country"] for r in test}

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.md").write_text("do not touch")
    refused = runner.invoke(app, ["qa", "countries", str(foreign)])
    assert isinstance(refused.exception, BrainforgeError) and "not written by `brainforge qa`" in str(refused.exception)
    assert sorted(p.name for p in foreign.iterdir()) == ["thesis.md"] and (foreign / "thesis.md").read_text() == "do not touch"


def test_cli_refusal_is_exit_code_2_without_traceback(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    done = subprocess.run([sys.executable, "-m", "brainforge", "qa", "countries", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=ENV)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: ") and "not written by `brainforge qa`" in done.stderr
