"""Off-policy trace files (issue 9, item 1): loading with validation (every problem names
file:line), the OpenR1-Math layout, column mapping, matching to prompts, the min-reward
filter, atomic writing, the trace's tokens as the chat template renders them (what LUFFY's
prefix_mask covers) and `brainforge traces show|stats`."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from brainforge.data.prompts import PromptExample
from brainforge.data.traces import (
    MAX_LINE_BYTES,
    Trace,
    filter_min_reward,
    load_traces,
    match_traces,
    prompt_key,
    tokenizer_fingerprint,
    trace_token_ids,
    write_traces,
)
from brainforge.errors import DataError

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
GOOD = {"prompt": "What is 2 + 3?", "response": "2 + 3 = 5"}


def write_lines(path: Path, *lines: str | dict) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


# ------------------------------------------------------------------------------ bad input

BAD_LINES = [
    ('{"prompt": "a", "response": ', "not valid JSON"),
    ('["prompt", "response"]', "expected a JSON object"),
    ({"prompt": "a"}, "'response' is missing"),
    ({"prompt": "a", "response": "   "}, "'response' must be a non-empty string"),
    ({"prompt": "a", "response": 5}, "'response' must be a non-empty string"),
    ({"prompt": ["a"], "response": "b"}, "'prompt' must be a non-empty string"),
    ({"prompt": "a", "response": "b", "reward": "high"}, "'reward' must be a finite number"),
    ({"prompt": "a", "response": "b", "reward": True}, "'reward' must be a finite number"),
    ('{"prompt": "a", "response": "b", "reward": NaN}', "'reward' must be a finite number"),
    ({"prompt": "a", "response": "b", "logprobs": "-0.1 -0.2", "token_ids": [1, 2]}, "'logprobs' must be a list of numbers"),
    ({"prompt": "a", "response": "b", "logprobs": [-0.1, "x"], "token_ids": [1, 2]}, "'logprobs'[1] must be a finite number"),
    ('{"prompt": "a", "response": "b", "logprobs": [-0.1, -Infinity], "token_ids": [1, 2]}', "'logprobs'[1] must be a finite"),
    ({"prompt": "a", "response": "b", "logprobs": [0.9, 0.5], "token_ids": [1, 2]}, "store log-probabilities, not probabilities"),
    ({"prompt": "a", "response": "b", "logprobs": [-0.1, -0.2], "token_ids": [1]}, "has 2 values but 'token_ids' has 1"),
    ({"prompt": "a", "response": "b", "logprobs": [-0.1]}, "'logprobs' without 'token_ids'"),
    ({"prompt": "a", "response": "b", "token_ids": [1, -2]}, "'token_ids' must be a list of token ids"),
    ({"response": "b", "source": "x"}, "neither 'prompt' nor 'prompt_id'"),
    ({"prompt_id": True, "response": "b"}, "'prompt_id' must be a string or whole number"),
    ({"problem": "a", "generations": ["x", "y"], "correctness_math_verify": [True]}, "'correctness_math_verify' must be a list of 2"),
    ({"problem": "a", "generations": ["x", ""]}, "generations[1] must be a non-empty string"),
]


@pytest.mark.parametrize("line,message", BAD_LINES, ids=[m for _, m in BAD_LINES])
def test_every_malformed_line_is_named_by_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "t.jsonl", GOOD, "", line, GOOD)  # the bad one is line 3 (line 2 is blank)
    with pytest.raises(DataError) as caught:
        load_traces(path)
    assert str(caught.value).startswith(f"{path}:3: ") and message in str(caught.value), str(caught.value)


def test_file_missing_directory_empty_and_not_utf8(tmp_path):
    with pytest.raises(DataError, match="no such trace file"):
        load_traces(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="is a directory"):
        load_traces(tmp_path)
    with pytest.raises(DataError, match="contains no traces"):
        load_traces(write_lines(tmp_path / "blank.jsonl", "", "  "))
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(DataError, match="contains no traces"):
        load_traces(tmp_path / "empty.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"prompt": "é", "response": "x"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not UTF-8"):
        load_traces(tmp_path / "latin1.jsonl")


def test_a_5_gib_line_is_named_without_reading_it_into_memory(tmp_path):
    path = write_lines(tmp_path / "huge.jsonl", GOOD)
    with path.open("r+b") as handle:  # line 2: 5 GiB of NUL bytes and no newline (sparse: costs no disk)
        handle.truncate(5 * 1024**3)
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as caught:
            load_traces(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert f"{path}:2: line is longer than 16 MiB" in str(caught.value)
    assert peak < 4 * MAX_LINE_BYTES, peak


def test_unknown_column_mapping_is_named(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", GOOD)
    with pytest.raises(DataError, match="unknown field 'question'"):
        load_traces(path, {"question": "problem"})


# ------------------------------------------------------------------------------ layouts


def test_fields_columns_and_gzip(tmp_path):
    path = write_lines(
        tmp_path / "t.jsonl",
        {"prompt": "Q1", "response": "A1", "reward": 1, "source": "worked:add", "logprobs": [-0.5, 0], "token_ids": [3, 4],
         "tokenizer": "49152:abc", "note": "kept"},
        {"prompt_id": 7, "response": "A2"},
    )
    first, second = load_traces(path)
    assert (first.prompt, first.response, first.reward, first.source) == ("Q1", "A1", 1.0, "worked:add")
    assert first.logprobs == [-0.5, 0.0] and first.token_ids == [3, 4] and first.tokenizer == "49152:abc"
    assert first.extra == {"note": "kept"} and first.where == f"{path}:1"
    assert second.prompt is None and second.prompt_id == "7" and second.source == "unknown" and second.where == f"{path}:2"

    mapped = write_lines(tmp_path / "m.jsonl", {"question": "Q", "solution": "S", "score": 0.5})
    (trace,) = load_traces(mapped, {"prompt": "question", "response": "solution", "reward": "score"})
    assert (trace.prompt, trace.response, trace.reward, trace.extra) == ("Q", "S", 0.5, {})
    with pytest.raises(DataError, match=r"m\.jsonl:1: 'answer' \(mapped to response\) is missing"):
        load_traces(mapped, {"prompt": "question", "response": "answer"})

    zipped = tmp_path / "t.jsonl.gz"
    zipped.write_bytes(gzip.compress(path.read_bytes()))
    assert [t.response for t in load_traces(zipped)] == ["A1", "A2"]


def test_openr1_math_layout_is_recognised(tmp_path):
    row = {"problem": "Find x if 2x = 6.", "solution": "x = 3", "answer": "3", "source": "olympiads",
           "generations": ["<think>\nhalve it</think>\nx = 3", "<think>\nguess</think>\nx = 4"],
           "correctness_math_verify": [True, False]}
    without_generations = {"problem": "Find y if y + 1 = 2.", "solution": "y = 1", "answer": "1", "generations": []}
    no_verdicts = {"problem": "P", "solution": "S", "generations": ["G"]}
    path = write_lines(tmp_path / "openr1.jsonl", row, without_generations, no_verdicts)
    traces = load_traces(path)
    assert [(t.prompt, t.response, t.reward, t.source, t.where) for t in traces] == [
        ("Find x if 2x = 6.", "<think>\nhalve it</think>\nx = 3", 1.0, "openr1", f"{path}:1"),
        ("Find x if 2x = 6.", "<think>\nguess</think>\nx = 4", 0.0, "openr1", f"{path}:1"),
        ("Find y if y + 1 = 2.", "y = 1", None, "openr1", f"{path}:2"),  # the solution only when there are no generations
        ("P", "G", None, "openr1", f"{path}:3"),
    ]
    assert traces[0].extra == {"answer": "3"}
    # an explicit mapping wins over recognition: the solution column is the response
    mapped = load_traces(path, {"prompt": "problem", "response": "solution"})
    assert [t.response for t in mapped] == ["x = 3", "y = 1", "S"]


def test_write_load_round_trip_is_atomic_and_only_writes_set_fields(tmp_path):
    traces = [
        Trace(response="A1", prompt="Q1", reward=1.0, source="worked:add", logprobs=[-0.1, -2.0], token_ids=[5, 6],
              tokenizer="49152:abc", where="somewhere:3", extra={"answer": "5"}),
        Trace(response="A2\nwith ünïcode", prompt_id="id-2"),
    ]
    path = tmp_path / "out" / "traces.jsonl"
    assert write_traces(path, traces) == 2
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert records[1] == {"prompt_id": "id-2", "response": "A2\nwith ünïcode", "source": "unknown"}
    assert "where" not in records[0] and records[0]["extra"] == {"answer": "5"}
    loaded = load_traces(path)
    for before, after in zip(traces, loaded):
        assert {**vars(after), "where": ""} == {**vars(before), "where": ""}

    # a failure while writing leaves the old file intact and no temp file behind
    def broken():
        yield Trace(response="new", prompt="new")
        raise RuntimeError("teacher crashed")

    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        write_traces(path, broken())
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == ["traces.jsonl"]
    with pytest.raises(DataError, match="is a directory"):
        write_traces(tmp_path, traces)


# ------------------------------------------------------------------------------ matching and filtering


def prompt(text: str, **columns) -> PromptExample:
    return PromptExample([{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}], columns)


def test_match_by_normalised_text_and_by_id_with_report():
    prompts = [prompt("What is  2 + 3?\n"), prompt("What is 4 + 4?", id=17), prompt("Unanswered one"), prompt("Unanswered two")]
    traces = [
        Trace(response="5", prompt="What is 2 + 3?", where="t:1"),
        Trace(response="8", prompt_id="17", where="t:2"),
        Trace(response="5 again", prompt=" What is\t2 +  3? ", where="t:3"),
        Trace(response="?", prompt="A question nobody asked", where="t:4"),
        Trace(response="?", prompt_id="None", where="t:5"),  # a prompt without an id column must not match "None"
    ]
    match = match_traces(prompts, traces)
    assert {i: [t.where for t in ts] for i, ts in match.by_prompt.items()} == {0: ["t:1", "t:3"], 1: ["t:2"]}
    assert match.prompts_without == [2, 3]
    assert [t.where for t in match.orphans] == ["t:4", "t:5"]
    report = match.report().splitlines()
    assert report[0] == "traces: 3 matched to 2 of 4 prompts; 2 prompts without a trace; 2 traces match no prompt"
    assert report[1:] == ["  no trace for prompt #2: 'Unanswered one'", "  no trace for prompt #3: 'Unanswered two'",
                          "  no prompt for trace at t:4: 'A question nobody asked'", "  no prompt for trace at t:5: prompt_id None"]
    assert prompt_key(" a\n b\t c ") == "a b c"


def test_report_shows_at_most_three_examples_of_each_kind():
    prompts = [prompt(f"q{i}") for i in range(5)]
    traces = [Trace(response="r", prompt=f"other {i}") for i in range(5)]
    report = match_traces(prompts, traces).report().splitlines()
    assert len(report) == 1 + 3 + 3


def test_min_reward_filter_keeps_traces_without_reward():
    traces = [Trace(response="a", prompt="p", reward=1.0), Trace(response="b", prompt="p", reward=0.0),
              Trace(response="c", prompt="p"), Trace(response="d", prompt="p", reward=0.5)]
    kept, dropped = filter_min_reward(traces, 0.5)
    assert [t.response for t in kept] == ["a", "c", "d"] and dropped == 1
    assert filter_min_reward(traces, None) == (traces, 0)


# ------------------------------------------------------------------------------ tokens

THINK_CHATML = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n<think>\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{% endif %}"
)
# R1-distill style: the generation prompt opens <think>, a rendered assistant turn does not add it
THINK_PROMPT_ONLY = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT: <think>\\n' }}{% endif %}"
)
THINK_TINY = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ 'ASSISTANT: <think>\\n' + message['content'] "
    "+ eos_token + '\\n' }}{% else %}{{ message['role'].upper() + ': ' + message['content'] + '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT: <think>\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_think_tokenizer():
    """A byte-level BPE tokenizer trained in memory, with <think> tags as special tokens and EOS `</s>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = ["USER: What is 2 + 3?", "ASSISTANT: I add the ones. 2 + 3 = 5", "SYSTEM: Be brief."] * 20
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["</s>", "<think>", "</think>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="</s>")


def encode_prompt(tokenizer, template: str, messages: list[dict]) -> list[int]:
    """What GRPOModule.encode_prompt gives the model before it generates."""
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]


def test_trace_tokens_on_the_default_chatml_template(tokenizer):
    response = "I add the ones: 2 + 3 = 5.\nThe answer is 5."
    ids = trace_token_ids(tokenizer, tokenizer.chat_template, MESSAGES, response)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert ids[-1] == im_end and im_end not in ids[:-1]  # ends at (and includes) the end of the turn, no "\n" after
    assert tokenizer.decode(ids) == response + "<|im_end|>"
    # prompt + trace is exactly the rendered conversation, token for token, up to the end of the turn
    prompt_ids = encode_prompt(tokenizer, tokenizer.chat_template, MESSAGES)
    full = tokenizer.apply_chat_template(MESSAGES + [{"role": "assistant", "content": response}], tokenize=False)
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert prompt_ids + ids == full_ids[: len(prompt_ids) + len(ids)] and full_ids[len(prompt_ids) + len(ids):] == \
        tokenizer("\n", add_special_tokens=False)["input_ids"]


def test_trace_tokens_when_the_tokenizer_merges_across_the_prompt_boundary(tokenizer):
    # "assistant\n" + "\n\nx" tokenizes as one "\n\n\n" run in the full text, but the model generates after the
    # prompt's own "\n" token: the trace must be the tokens that follow the prompt ids, not a slice of the full text
    response = "\n\nThe answer is 5."
    ids = trace_token_ids(tokenizer, tokenizer.chat_template, MESSAGES, response)
    prompt_ids = encode_prompt(tokenizer, tokenizer.chat_template, MESSAGES)
    assert tokenizer.decode(ids) == response + "<|im_end|>"
    assert tokenizer.decode(prompt_ids + ids) == tokenizer.apply_chat_template(
        MESSAGES + [{"role": "assistant", "content": response}], tokenize=False).removesuffix("\n")


def test_trace_tokens_do_not_double_a_think_tag_the_template_already_opened(tokenizer):
    response = "<think>\nones: 2 + 3 = 5\n</think>\nThe answer is 5."
    ids = trace_token_ids(tokenizer, THINK_CHATML, MESSAGES, response)
    prompt_ids = encode_prompt(tokenizer, THINK_CHATML, MESSAGES)
    assert tokenizer.decode(prompt_ids).endswith("<|im_start|>assistant\n<think>\n")
    assert tokenizer.decode(ids) == "ones: 2 + 3 = 5\n</think>\nThe answer is 5.<|im_end|>"
    assert tokenizer.decode(prompt_ids + ids).count("<think>") == 1
    # a response without the tag renders the same way
    assert trace_token_ids(tokenizer, THINK_CHATML, MESSAGES, response.removeprefix("<think>\n")) == ids


def test_trace_tokens_on_a_tiny_tokenizer_with_special_think_tokens(tiny_think_tokenizer):
    tok = tiny_think_tokenizer
    think, eos = tok.convert_tokens_to_ids("<think>"), tok.eos_token_id
    response = "<think>\nI add the ones.</think>2 + 3 = 5"
    prompt_ids = encode_prompt(tok, THINK_TINY, MESSAGES)
    ids = trace_token_ids(tok, THINK_TINY, MESSAGES, response)
    assert prompt_ids[-2:] == [think, tok("\n", add_special_tokens=False)["input_ids"][0]]
    assert think not in ids and ids[-1] == eos and eos not in ids[:-1]
    assert tok.decode(ids) == "I add the ones.</think>2 + 3 = 5</s>"
    assert (prompt_ids + ids).count(think) == 1

    # the tag only in the generation prompt (R1-distill style): the response's own tag is what follows it
    ids = trace_token_ids(tok, THINK_PROMPT_ONLY, MESSAGES, response)
    assert tok.decode(encode_prompt(tok, THINK_PROMPT_ONLY, MESSAGES) + ids).count("<think>") == 1
    assert tok.decode(ids) == "I add the ones.</think>2 + 3 = 5</s>"


def test_trace_tokens_name_template_problems(tokenizer, tiny_think_tokenizer):
    with pytest.raises(DataError, match=r"^t\.jsonl:4: the chat template renders an assistant turn that does not start"):
        trace_token_ids(tiny_think_tokenizer, THINK_PROMPT_ONLY, MESSAGES, "no think tag here", where="t.jsonl:4")
    no_end = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}" \
             "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    with pytest.raises(DataError, match="does not end the assistant turn with an end-of-turn token"):
        trace_token_ids(tokenizer, no_end, MESSAGES, "5")
    with pytest.raises(DataError, match="contains the end-of-turn marker '<\\|im_end\\|>'"):
        trace_token_ids(tokenizer, tokenizer.chat_template, MESSAGES, "5<|im_end|>more")


def test_tokenizer_fingerprint_is_stable_and_tells_vocabularies_apart(tokenizer, tiny_think_tokenizer, default_model_dir):
    from brainforge.models.loader import load_tokenizer

    print_ = tokenizer_fingerprint(tokenizer)
    assert print_ == tokenizer_fingerprint(load_tokenizer(str(default_model_dir)))
    assert print_.startswith(f"{len(tokenizer.get_vocab())}:") and len(print_.split(":")[1]) == 16
    assert tokenizer_fingerprint(tiny_think_tokenizer) != print_


# ------------------------------------------------------------------------------ CLI


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "brainforge", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=ENV)


def test_traces_show_and_stats_on_a_real_file(tmp_path):
    from typer.testing import CliRunner

    from brainforge.cli import app

    path = write_lines(
        tmp_path / "openr1.jsonl",
        {"problem": "Find x if 2x = 6.", "answer": "3", "generations": ["<think>\nhalve it</think>\nx = 3", "x = 4"],
         "correctness_math_verify": [True, False]},
        {"prompt": "What is 2 + 3?", "response": "2 + 3 = 5", "reward": 1.0, "source": "worked:add",
         "logprobs": [-0.1, -0.2], "token_ids": [17, 18]},
        {"prompt_id": "q9", "response": "a longer answer " * 10},
    )
    runner = CliRunner()
    shown = runner.invoke(app, ["traces", "show", str(path), "--n", "2", "--max-chars", "20"])
    assert shown.exit_code == 0, shown.output
    assert f"[1] {path}:1  source=openr1  reward=1" in shown.output and f"[2] {path}:1  source=openr1  reward=0" in shown.output
    assert "prompt:   Find x if 2x = 6." in shown.output and "[3]" not in shown.output

    stats = runner.invoke(app, ["traces", "stats", str(path)])
    assert stats.exit_code == 0, stats.output
    out = stats.output
    assert "traces: 4  distinct prompts: 3  with logprobs: 1" in out and "sources: openr1 2, worked:add 1, unknown 1" in out
    assert "response tokens (default): min " in out and " p90 " in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert rows["0"].split()[1] == "1" and rows["1"].split()[1] == "2" and "no reward" in out

    from brainforge.teachers.worked import FAMILIES

    families = runner.invoke(app, ["traces", "families"])
    assert families.exit_code == 0 and len(families.output.splitlines()) == len(FAMILIES) > 0
    name, description = next(iter(FAMILIES.items()))
    assert families.output.splitlines()[0].split(None, 1) == [name, description]

    mapped = write_lines(tmp_path / "mapped.jsonl", {"question": "Q", "solution": "S"})
    shown = runner.invoke(app, ["traces", "show", str(mapped), "--columns", "prompt=question,response=solution"])
    assert shown.exit_code == 0 and "response: S" in shown.output


def test_traces_cli_bad_file_is_a_one_line_error(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", GOOD, '{"prompt": "x", "response": "y", "reward": "high"}')
    result = run_cli("traces", "show", str(path), "--n", "5", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip() == f"error: {path}:2: 'reward' must be a finite number or null, got \"high\""
    bad_columns = run_cli("traces", "stats", str(path), "--columns", "prompt", cwd=tmp_path)
    assert bad_columns.returncode == 2 and "--columns 'prompt': write FIELD=COLUMN" in bad_columns.stderr
