"""APO (agents/apo.py): the ProTeGi beam search, the rewrite parser, and the optimiser client.

The search-logic tests use a deterministic `evaluate` (a task is solved when the prompt
contains the word the task needs) and test doubles with `OptimiserClient`'s method shape
(`critique`, `rewrite`) instead of a model: they test the search (selection, rejection,
caching, the test split, the files), not the product path. `OptimiserClient` itself is
tested with the real `openai` client against a small OpenAI-compatible HTTP endpoint on a
free loopback port, which answers like a chat-completions API does.
"""

from __future__ import annotations

import json
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from brainforge.agents.apo import (
    BEST_PROMPT_FILE,
    RESULT_FILE,
    EvaluatedRollout,
    OptimiserCallError,
    OptimiserClient,
    OptimiserError,
    critique_messages,
    extract_prompt,
    pick_for_critique,
    rewrite_messages,
    run_apo,
)
from brainforge.config import ApoOptimiserSettings, ApoSettings
from brainforge.errors import ConfigError, DataError

WORDS = ["alpha", "beta", "gamma", "delta", "omega"]
SEED = "Solve {task}."


def make_tasks(split: str, n: int) -> list[dict[str, Any]]:
    return [{"id": f"{split}-{i}", "need": WORDS[i % len(WORDS)]} for i in range(n)]


TRAIN, VALIDATION, TEST = make_tasks("train", 10), make_tasks("val", 10), make_tasks("test", 5)


class WordEvaluator:
    """reward 1 when the prompt holds the word the task needs; records every call.
    `reverse_test`: on the test split the reward is reversed, so selecting on test would show."""

    def __init__(self, reverse_test: bool = False) -> None:
        self.calls: list[tuple[str, str, str]] = []   # (split, prompt, normalised prompt)
        self.reverse_test = reverse_test
        self.lock = threading.Lock()

    def __call__(self, prompt: str, tasks: list[dict[str, Any]]) -> list[EvaluatedRollout]:
        split = tasks[0]["id"].split("-")[0]
        with self.lock:
            self.calls.append((split, prompt, " ".join(prompt.split())))
        out = []
        for task in tasks:
            solved = task["need"] in prompt
            if split == "test" and self.reverse_test:
                solved = not solved
            out.append(EvaluatedRollout(reward=float(solved), transcript=f"task {task['id']} needed '{task['need']}'",
                                        task_id=task["id"]))
        return out

    def prompts(self, split: str) -> list[str]:
        return [normal for s, _, normal in self.calls if s == split]


class LearnsWords:
    """Test double (OptimiserClient's method shape): the critique names the words of the shown
    failures in the order shown; the rewrite adds the first. Pure in its inputs, so the
    history does not depend on thread timing."""

    def critique(self, prompt: str, rollouts) -> str:
        words = [r.transcript.split("'")[1] for r in rollouts if r.score < 1]
        return "missing: " + ",".join(dict.fromkeys(words))

    def rewrite(self, prompt: str, critique: str, placeholders) -> str:
        words = critique.removeprefix("missing: ").split(",")
        return f"Sure, here it is.\n<new_prompt>\n{prompt} Mention {words[0] or 'nothing'}.\n</new_prompt>"


class Scripted:
    """Test double answering rewrites from a list, in order (run with max_parallel_edits=1);
    an exception in the list is raised instead."""

    def __init__(self, replies: list[Any]) -> None:
        self.replies = list(replies)
        self.critiques: list[str] = []

    def critique(self, prompt: str, rollouts) -> str:
        self.critiques.append(prompt)
        return "be more specific"

    def rewrite(self, prompt: str, critique: str, placeholders) -> str:
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply(prompt) if callable(reply) else reply


def settings(**overrides: Any) -> ApoSettings:
    values = dict(beam_width=2, branch_factor=2, rounds=3, critique_batch=2, train_batch=5, validation_batch=5)
    values.update(overrides)
    return ApoSettings(**values)


def load(out: Path) -> dict[str, Any]:
    return json.loads((out / RESULT_FILE).read_text())


# ------------------------------------------------------------------------------ the search


def test_search_improves_the_prompt_and_writes_its_history(tmp_path):
    evaluate = WordEvaluator()
    result = run_apo(settings(), SEED, evaluate, LearnsWords(), TRAIN, VALIDATION, TEST, tmp_path, seed=0)

    assert result.seed_validation == 0.0
    assert result.best_validation > result.seed_validation
    assert "{task}" in result.best_prompt and result.best_prompt != SEED
    data = load(tmp_path)
    assert data["status"] == "finished" and data["rounds_completed"] == 3
    assert data["seed_prompt"] == SEED and data["best_prompt"] == result.best_prompt
    assert data["best_validation_score"] == result.best_validation and data["best_test_score"] == result.best_test
    assert data["seed_validation_score"] == 0.0 and data["seed_test_score"] == result.seed_test == 0.0
    assert data["settings"]["beam_width"] == 2 and data["placeholders"] == ["{task}"]
    assert (tmp_path / BEST_PROMPT_FILE).read_text() == result.best_prompt + "\n"
    children = [c for c in data["candidates"] if c["parent"] is not None]
    assert len(children) == sum(2 * len(r["parents"]) for r in data["rounds"])   # branch_factor per beam prompt
    assert all(c["critique"].startswith("missing: ") for c in children)
    best = data["candidates"][data["best_candidate"]]
    assert best["prompt"] == result.best_prompt and best["validation_score"] == result.best_validation
    assert not list(tmp_path.glob("*.tmp"))


def test_best_ever_is_kept_when_later_rounds_are_worse(tmp_path):
    good = SEED + " Mention alpha beta gamma delta omega."

    class GoodThenBad(Scripted):
        def rewrite(self, prompt, critique, placeholders):
            # the seed gets a perfect rewrite; everything after that only loses words
            if prompt == SEED:
                return f"<new_prompt>{good}</new_prompt>"
            kept = prompt.split()[:-1 - len(self.critiques)]
            return f"<new_prompt>{' '.join(kept)}.</new_prompt>"

    result = run_apo(settings(beam_width=1, branch_factor=1), SEED, WordEvaluator(), GoodThenBad([]), TRAIN,
                     VALIDATION, TEST, tmp_path, max_parallel_edits=1)

    data = load(tmp_path)
    later = [c for c in data["candidates"] if c["round"] > 1 and c["rejected"] is None]
    assert later and all(c["validation_score"] < 1.0 for c in later)       # the later rounds were worse
    assert result.best_prompt == good and result.best_validation == 1.0
    assert data["candidates"][data["best_candidate"]]["round"] == 1
    assert (tmp_path / BEST_PROMPT_FILE).read_text() == good + "\n"


def test_bad_rewrites_are_rejected_before_evaluation_and_recorded(tmp_path):
    accepted = "Solve {task}. Mention alpha."
    replies = [
        "",                                                    # nothing at all
        "<new_prompt>   </new_prompt>",                        # empty between the markers
        "<new_prompt>  Solve   {task}. </new_prompt>",         # the parent again, respaced
        "<new_prompt>Solve it. Mention alpha.</new_prompt>",   # lost {task}
        f'<new_prompt>"{accepted}"</new_prompt>',              # quoted: accepted, unquoted
        "```\nSolve {task}.   Mention alpha.\n```",            # same text again, fenced
        OptimiserCallError("the optimiser timed out"),
    ]
    evaluate = WordEvaluator()
    result = run_apo(settings(beam_width=1, branch_factor=len(replies), rounds=1), SEED, evaluate,
                     Scripted(replies), TRAIN, VALIDATION, TEST, tmp_path, max_parallel_edits=1)

    children = [c for c in load(tmp_path)["candidates"] if c["parent"] == 0]
    reasons = [c["rejected"] for c in children]
    assert reasons[0].startswith("empty") and reasons[1].startswith("empty")
    assert reasons[2].startswith("unchanged")
    assert reasons[3] == "lost required placeholder(s) {task}"
    assert reasons[4] is None and children[4]["prompt"] == accepted and children[4]["validation_score"] == 0.2
    assert reasons[5] == f"duplicate of candidate #{children[4]['id']}"
    assert reasons[6].startswith("optimiser call failed") and "timed out" in reasons[6]
    assert children[6]["critique"] == "be more specific"      # what the optimiser did say is kept
    assert all(c["validation_score"] is None for c in children if c["rejected"])
    assert children[3]["reply"] == replies[3]                  # the raw reply is kept for debugging
    # only the seed and the one survivor were ever scored on validation
    assert sorted(set(evaluate.prompts("val"))) == sorted([SEED, accepted])
    assert result.best_prompt == accepted


def test_the_test_split_is_only_used_for_the_final_report(tmp_path):
    evaluate = WordEvaluator(reverse_test=True)       # on test, the validation winner does worse
    result = run_apo(settings(), SEED, evaluate, LearnsWords(), TRAIN, VALIDATION, TEST, tmp_path, seed=3)

    splits = [split for split, _, _ in evaluate.calls]
    assert splits[-2:] == ["test", "test"] and "test" not in splits[:-2]
    assert [normal for _, _, normal in evaluate.calls[-2:]] == [SEED, " ".join(result.best_prompt.split())]
    # selected on validation, reported honestly on test
    assert result.best_validation > result.seed_validation and result.best_test < result.seed_test
    data = load(tmp_path)
    assert data["best_test_score"] == result.best_test and data["test_tasks"] == len(TEST)


def test_test_batch_samples_the_test_split_and_the_seed_is_scored_once_when_it_wins(tmp_path):
    class NeverBetter(Scripted):
        def rewrite(self, prompt, critique, placeholders):
            return "<new_prompt>Solve {task} quickly.</new_prompt>"

    evaluate = WordEvaluator()
    result = run_apo(settings(rounds=1, test_batch=3), SEED, evaluate, NeverBetter([]), TRAIN, VALIDATION, TEST,
                     tmp_path)
    assert result.best_prompt == SEED                  # a tie goes to the older prompt: no change without gain
    assert [split for split, _, _ in evaluate.calls].count("test") == 1
    assert load(tmp_path)["test_tasks"] == 3 and result.best_test == result.seed_test


def test_apo_json_is_written_every_round_and_survives_a_crash_in_round_2(tmp_path):
    class CrashesInRound2(WordEvaluator):
        def __init__(self) -> None:
            super().__init__()
            self.seen_rounds: list[int] = []

        def __call__(self, prompt, tasks):
            if tasks[0]["id"].startswith("train"):
                self.seen_rounds.append(load(tmp_path)["rounds_completed"])
                if len(self.seen_rounds) == 2:             # beam_width 1: the second training run is round 2
                    raise RuntimeError("the machine died")
            return super().__call__(prompt, tasks)

    evaluate = CrashesInRound2()
    with pytest.raises(RuntimeError, match="machine died"):
        run_apo(settings(beam_width=1), SEED, evaluate, LearnsWords(), TRAIN, VALIDATION, TEST, tmp_path)

    assert evaluate.seen_rounds == [0, 1]              # written after the seed, then after round 1
    data = load(tmp_path)
    assert data["status"] == "running" and data["rounds_completed"] == 1
    assert {c["round"] for c in data["candidates"]} == {0, 1}
    assert data["best_test_score"] is None and data["seed_test_score"] is None
    assert (tmp_path / BEST_PROMPT_FILE).read_text() == data["best_prompt"] + "\n"
    assert data["best_validation_score"] > 0
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_a_prompt_text_is_scored_on_validation_once(tmp_path):
    class BackToSeed(Scripted):
        def rewrite(self, prompt, critique, placeholders):
            if prompt == SEED:
                word = WORDS[len(self.critiques) % len(WORDS)]
                return f"<new_prompt>{SEED} Mention {word}.</new_prompt>"
            return f"<new_prompt>  Solve\n{{task}}.  </new_prompt>"       # the seed again, respaced

    evaluate = WordEvaluator()
    run_apo(settings(beam_width=3, branch_factor=3, rounds=3), SEED, evaluate, BackToSeed([]), TRAIN, VALIDATION,
            TEST, tmp_path, max_parallel_edits=1)

    scored = evaluate.prompts("val")
    assert len(scored) == len(set(scored)) >= 3       # every distinct text once, however often it came back
    data = load(tmp_path)
    assert any(c["rejected"] == "duplicate of candidate #0" for c in data["candidates"])
    kept = [c for c in data["candidates"] if c["rejected"] is None]
    assert len(kept) == len(scored)


def test_the_same_seed_gives_the_same_history_with_parallel_edits(tmp_path):
    def history(out: Path) -> list[tuple]:
        run_apo(settings(), SEED, WordEvaluator(), LearnsWords(), TRAIN, VALIDATION, TEST, out, seed=7,
                max_parallel_edits=8)
        return [(c["parent"], c["prompt"], c["critique"], c["validation_score"], c["rejected"])
                for c in load(out)["candidates"]]

    assert history(tmp_path / "a") == history(tmp_path / "b")


def test_evaluate_must_return_one_rollout_per_task(tmp_path):
    with pytest.raises(ValueError, match="one EvaluatedRollout per task"):
        run_apo(settings(), SEED, lambda prompt, tasks: [], LearnsWords(), TRAIN, VALIDATION, TEST, tmp_path)


def test_placeholders_default_to_the_seeds_and_configured_ones_are_checked(tmp_path):
    seed = "Solve {task} with {tools}. Answer as JSON like {\"answer\": 1}."
    dropped_tools = "<new_prompt>Solve {task}. Mention alpha.</new_prompt>"

    run_apo(settings(beam_width=1, branch_factor=1, rounds=1), seed, WordEvaluator(), Scripted([dropped_tools]),
            TRAIN, VALIDATION, TEST, tmp_path / "default", max_parallel_edits=1)
    data = load(tmp_path / "default")
    assert data["placeholders"] == ["{task}", "{tools}"]
    assert data["candidates"][1]["rejected"] == "lost required placeholder(s) {tools}"

    run_apo(settings(beam_width=1, branch_factor=1, rounds=1, placeholders=["{task}"]), seed, WordEvaluator(),
            Scripted([dropped_tools]), TRAIN, VALIDATION, TEST, tmp_path / "explicit", max_parallel_edits=1)
    assert load(tmp_path / "explicit")["candidates"][1]["rejected"] is None

    with pytest.raises(ConfigError, match=r"algorithm\.apo\.placeholders: '\{question\}' does not occur"):
        run_apo(settings(placeholders=["{question}"]), seed, WordEvaluator(), LearnsWords(), TRAIN, VALIDATION, TEST,
                tmp_path / "bad")


@pytest.mark.parametrize("split, args, match", [
    ("train", ([], VALIDATION, TEST), "training split has no tasks"),
    ("validation", (TRAIN, [], TEST), r"validation split 'validation' has no tasks; set algorithm\.apo\.validation_split"),
    ("test", (TRAIN, VALIDATION, []), r"test split 'test' has no tasks; set algorithm\.apo\.test_split"),
])
def test_empty_splits_are_refused_before_any_work(tmp_path, split, args, match):
    evaluate = WordEvaluator()
    with pytest.raises(DataError, match=match):
        run_apo(settings(), SEED, evaluate, LearnsWords(), *args, tmp_path)
    assert evaluate.calls == []


def test_an_empty_seed_prompt_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="system_prompt is empty"):
        run_apo(settings(), "  \n", WordEvaluator(), LearnsWords(), TRAIN, VALIDATION, TEST, tmp_path)


def test_failures_are_shown_first():
    rollouts = [EvaluatedRollout(reward, f"r{i}") for i, reward in enumerate([1.0, 0.0, None, 0.5, float("nan"), 1.0])]
    picked = pick_for_critique(random.Random(0), rollouts, 3)
    assert {r.transcript for r in picked} == {"r1", "r2", "r4"}        # 0, None and NaN all count as 0
    assert [r.transcript for r in pick_for_critique(random.Random(0), rollouts, 4)][3] == "r3"


# ------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize("reply, expected", [
    ("<new_prompt>\nBe exact about {task}.\n</new_prompt>", "Be exact about {task}."),
    ("I put it between <new_prompt> and </new_prompt>:\n<new_prompt>Use tools for {task}.</new_prompt>",
     "Use tools for {task}."),
    ("<think>maybe <new_prompt>draft</new_prompt></think>\n<new_prompt>Final {task}</new_prompt>", "Final {task}"),
    ("<new_prompt>\n```text\n\"Fenced and quoted {task}\"\n```\n</new_prompt>", "Fenced and quoted {task}"),
    ("<new_prompt>New prompt: Labelled {task}</new_prompt>", "Labelled {task}"),
    ("<new_prompt>The reply ran out here {task}", "The reply ran out here {task}"),
    ("Here is the improved prompt:\n```\nIn a fence {task}\n```\nHope it helps.", "In a fence {task}"),
    ("Here is the improved prompt:\nLine one {task}.\nLine two.", "Line one {task}.\nLine two."),
    ("\u201cCurly quotes {task}\u201d", "Curly quotes {task}"),
    ('"Be brief," said the prompt. "Always."', '"Be brief," said the prompt. "Always."'),
    ("", ""),
    ("<new_prompt> \n </new_prompt>", ""),
    ("<think>only thinking, cut off", ""),
])
def test_extract_prompt(reply, expected):
    assert extract_prompt(reply) == expected


def test_optimiser_messages_hold_the_prompt_transcripts_and_placeholders():
    long = "x" * 5000 + "THE END"
    messages = critique_messages("Solve {task}.", [EvaluatedRollout(0.0, "first"), EvaluatedRollout(None, long)])
    text = messages[-1]["content"]
    assert "Solve {task}." in text and "first" in text and "THE END" in text and "characters left out" in text
    assert "(reward 0)" in text and len(text) < 4000
    rewrite = rewrite_messages("Solve {task}.", "too vague", ["{task}"])[-1]["content"]
    assert "too vague" in rewrite and "{task}" in rewrite and "<new_prompt> and </new_prompt>" in rewrite


# ------------------------------------------------------------------------------ the optimiser client


class FakeChatAPI:
    """A minimal OpenAI-compatible chat-completions endpoint on a free loopback port."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.status = 200
        self.answer = "<new_prompt>Solve {task} step by step.</new_prompt>"
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                api.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                if api.status == 200:
                    payload = {"id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                               "choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant", "content": api.answer}}],
                               "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
                else:
                    payload = {"error": {"message": f"refused with {api.status}", "type": "invalid_request_error"}}
                data = json.dumps(payload).encode()
                self.send_response(api.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeChatAPI":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=30)


def test_optimiser_client_talks_to_an_openai_compatible_endpoint(monkeypatch):
    monkeypatch.setenv("APO_TEST_KEY", "sk-test-123")
    with FakeChatAPI() as api:
        client = OptimiserClient(ApoOptimiserSettings(endpoint=api.url, model="critic", api_key_env="APO_TEST_KEY",
                                                      temperature=0.3, max_tokens=77), max_retries=0)
        api.answer = "The prompt never says to use the calculator."
        critique = client.critique("Solve {task}.", [EvaluatedRollout(0.0, "asked 2+2, answered 5")])
        api.answer = "<new_prompt>Solve {task}. Use the calculator.</new_prompt>"
        reply = client.rewrite("Solve {task}.", critique, ["{task}"])

    assert critique == "The prompt never says to use the calculator."
    assert extract_prompt(reply) == "Solve {task}. Use the calculator."
    (headers, first), (_, second) = api.requests
    assert headers["authorization"] == "Bearer sk-test-123"
    assert first["model"] == "critic" and first["temperature"] == 0.3 and first["max_tokens"] == 77
    assert "asked 2+2, answered 5" in first["messages"][-1]["content"]
    assert critique in second["messages"][-1]["content"] and "{task}" in second["messages"][-1]["content"]


def test_optimiser_client_defaults_to_the_local_server():
    with FakeChatAPI() as api:
        client = OptimiserClient(ApoOptimiserSettings(), api.url, local_api_key="local-key", local_model="brainforge",
                                 max_retries=0)
        client.critique("p", [])
    headers, body = api.requests[0]
    assert body["model"] == "brainforge" and headers["authorization"] == "Bearer local-key"


def test_optimiser_client_config_errors(monkeypatch):
    monkeypatch.delenv("APO_MISSING_KEY", raising=False)
    with pytest.raises(ConfigError, match="api_key_env: the environment variable APO_MISSING_KEY is not set"):
        OptimiserClient(ApoOptimiserSettings(endpoint="http://127.0.0.1:9/v1", api_key_env="APO_MISSING_KEY"))
    with pytest.raises(ConfigError, match="no local server URL was given"):
        OptimiserClient(ApoOptimiserSettings())


def test_optimiser_failures_reject_a_candidate_or_stop_the_run(tmp_path):
    with FakeChatAPI() as api:
        client = OptimiserClient(ApoOptimiserSettings(endpoint=api.url), max_retries=0)
        api.status = 400                                # one refused request: that candidate is rejected
        result = run_apo(settings(beam_width=1, branch_factor=2, rounds=1), SEED, WordEvaluator(), client, TRAIN,
                         VALIDATION, TEST, tmp_path / "refused")
        api.status = 401                                # a refused key: the optimiser cannot be used at all
        with pytest.raises(OptimiserError, match="cannot be used.*algorithm.apo.optimiser.endpoint"):
            run_apo(settings(), SEED, WordEvaluator(), client, TRAIN, VALIDATION, TEST, tmp_path / "unauthorised")

    children = [c for c in load(tmp_path / "refused")["candidates"] if c["parent"] is not None]
    assert len(children) == 2 and all(c["rejected"].startswith("optimiser call failed") for c in children)
    assert result.best_prompt == SEED
    assert load(tmp_path / "unauthorised")["rounds_completed"] == 0    # the seed's score is on disk

    closed = OptimiserClient(ApoOptimiserSettings(endpoint=api.url), max_retries=0)   # server gone
    with pytest.raises(OptimiserError, match="cannot be used"):
        closed.critique("p", [])


def test_the_local_policy_server_as_the_optimiser(tmp_path, tiny_model_dir, tokenizer):
    """The product path: OptimiserClient pointed at brainforge's own policy server (endpoint
    null), here serving the tiny random model, whose replies are noise: the run must finish,
    with every child recorded (critique and reply from the server) and any noise rejected."""
    import torch
    from transformers import AutoModelForCausalLM

    from brainforge.agents.server import PolicyServer
    from brainforge.config import PolicyServerSettings

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with PolicyServer(model, tokenizer, tokenizer.chat_template, PolicyServerSettings(max_tokens=12), None,
                      model_name="policy") as server:
        client = OptimiserClient(ApoOptimiserSettings(max_tokens=12), server.base_url, local_model="policy", max_retries=0)
        result = run_apo(settings(beam_width=1, branch_factor=2, rounds=1), SEED, WordEvaluator(), client, TRAIN,
                         VALIDATION, TEST, tmp_path)

    data = load(tmp_path)
    children = [c for c in data["candidates"] if c["parent"] == 0]
    assert data["status"] == "finished" and len(children) == 2
    for child in children:
        assert isinstance(child["critique"], str) and isinstance(child["reply"], str)
        assert (child["rejected"] is None) == (child["validation_score"] is not None)
        if child["rejected"] is None:
            assert "{task}" in child["prompt"]
    assert result.best_validation >= result.seed_validation


def test_transcript_text_renders_a_stored_rollout(tmp_path):
    from brainforge.agents.apo import transcript_text
    from brainforge.agents.store import CallRecord, ToolEvent, TraceStore

    def call(messages, text, tool_calls=()):
        return CallRecord(rollout_id="r1", messages=messages, tools=None, prompt_ids=[1], completion_ids=[2],
                          logprobs=[-0.1], text=text, tool_calls=list(tool_calls), finish_reason="stop", params={})

    add = {"id": "c0", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "6*7"}'}}
    first = [{"role": "system", "content": "THE PROMPT UNDER REVIEW"}, {"role": "user", "content": "What is 6*7?"}]
    second = first + [{"role": "assistant", "content": "", "tool_calls": [add]},
                      {"role": "tool", "tool_call_id": "c0", "content": "42"}]
    with TraceStore(tmp_path / "traces.sqlite") as store:
        store.start_rollout("r1", task_id="t1", task={"prompt": "What is 6*7?", "answer": "42"})
        store.record_call(call(first, "", [add]))
        store.record_tool(ToolEvent(rollout_id="r1", name="calculator", arguments={"expression": "6*7"}, output="42",
                                    call_index=0))
        store.record_call(call(second, "It is 41."))
        store.finish_rollout("r1", "succeeded", reward=0.0)
        text = transcript_text(store.get_rollout("r1"))

    assert "THE PROMPT UNDER REVIEW" not in text
    assert text.splitlines() == [
        "[user] What is 6*7?",
        "[assistant]",
        '  -> calls calculator({"expression": "6*7"})',
        "[tool] 42",
        "[assistant] It is 41.",
        "Expected answer: 42",
        "Outcome: succeeded, reward 0.0",
    ]
