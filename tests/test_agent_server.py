"""The OpenAI-compatible policy server, driven by the real `openai` client over loopback:
chat, tools, stop strings, n > 1, token ids / log-probs identical to the trace store's,
concurrent clients sharing decode batches, malformed requests, context length, API key,
finished rollouts. The request <-> text rendering is tested directly as units."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest
import torch

from brainforge.agents.chat_format import (RequestError, encode_prompt, lower_messages, parse_tool_calls,
                                           tool_role_for, validate_tools)
from brainforge.data.templates import ALPACA_TEMPLATE
from brainforge.agents.server import PolicyServer
from brainforge.agents.store import TraceStore
from brainforge.config import PolicyServerSettings
from brainforge.errors import BrainforgeError
from brainforge.generation.engine import Rollout

USER = [{"role": "user", "content": "Hello there"}]
ADD_TOOL = {"type": "function", "function": {"name": "add", "description": "Add two integers.",
                                              "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                                                              "b": {"type": "integer"}}}}}


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    traces = TraceStore(tmp_path_factory.mktemp("traces") / "traces.sqlite")
    yield traces
    traces.close()


@pytest.fixture(scope="module")
def server(model, tokenizer, store):
    settings = PolicyServerSettings(max_tokens=16, batch_wait_ms=300, max_batch_size=16)
    policy = PolicyServer(model, tokenizer, tokenizer.chat_template, settings, store, model_name="tiny")
    policy.start()
    try:
        yield policy
    finally:
        policy.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=300)


def post(server, path: str, body, headers=None) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.base_url + path, content=content, headers={"Content-Type": "application/json", **(headers or {})},
                      timeout=300)


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None, words: str = "") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in error["message"] and "\n" not in error["message"]
    if param is not None:
        assert error["param"] == param, error
    assert words.lower() in error["message"].lower(), error
    return error


# ------------------------------------------------------------------------------ units: render and parse


def test_tool_calls_parse_into_openai_layout_and_invalid_blocks_stay_text():
    text = ('Let me add. <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
            '<tool_call>{"name": "add", "arguments": not json}</tool_call>'
            '<tool_call>{"name": "mul", "arguments": "{\\"x\\": 3}"}</tool_call>')
    content, calls = parse_tool_calls(text)
    assert [c["function"]["name"] for c in calls] == ["add", "mul"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"a": 1, "b": 2}, {"x": 3}]
    assert all(c["type"] == "function" and c["id"].startswith("call_") and int(c["id"][5:], 16) >= 0 for c in calls)
    assert len({c["id"] for c in calls}) == 2
    assert content == 'Let me add. <tool_call>{"name": "add", "arguments": not json}</tool_call>'
    # No name, a non-object, or plain text: no tool call, the text is returned unchanged.
    for plain in ('<tool_call>{"arguments": {}}</tool_call>', "<tool_call>[1, 2]</tool_call>", "just text"):
        assert parse_tool_calls(plain) == (plain, [])
    # Only a call: content is None; a last block cut off by EOS still counts when its JSON is whole.
    assert parse_tool_calls('<tool_call>{"name": "add", "arguments": {"a": 1}}')[0] is None


def test_request_messages_render_tools_calls_and_results_in_one_text_form():
    tools = validate_tools([ADD_TOOL])
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "1+2?"}]},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "3"},
                {"role": "tool", "tool_call_id": "call_2", "content": "ok"}]
    assert [t["role"] for t in lower_messages(messages, tools)][3:] == ["tool", "tool"]  # one tool turn per result (ChatML)
    assert [t["content"] for t in lower_messages(messages, tools)][3:] == ["3", "ok"]
    assert tool_role_for("{{ '<|im_start|>' + message['role'] }}") == "tool" and tool_role_for(ALPACA_TEMPLATE) == "user"
    turns = lower_messages(messages, tools, tool_role="user")  # templates that cannot write a tool turn
    assert [t["role"] for t in turns] == ["system", "user", "assistant", "user"]
    assert '"name": "add"' in turns[0]["content"] and "<tool_call>" in turns[0]["content"]  # created, with the how-to
    assert turns[1]["content"] == "What is 1+2?"
    assert turns[2]["content"] == '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
    assert turns[3]["content"] == "<tool_response>\n3\n</tool_response>\n<tool_response>\nok\n</tool_response>"
    # Round trip: what the parser returns, sent back as the assistant message, renders as the model wrote it.
    written = '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
    _, parsed = parse_tool_calls(written)
    assert lower_messages([{"role": "assistant", "content": None, "tool_calls": parsed}], [])[0]["content"] == written
    # An existing system message gets the tool text appended, not replaced.
    turns = lower_messages([{"role": "system", "content": "Be brief."}, USER[0]], tools)
    assert turns[0]["content"].startswith("Be brief.\n\n") and len(turns) == 2


@pytest.mark.parametrize("messages, param, words", [
    ([], "messages", "empty"),
    ("hi", "messages", "list"),
    ([{"role": "wizard", "content": "x"}], "messages[0].role", "wizard"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content[0]", "image_url"),
    ([{"role": "user", "content": 5}], "messages[0].content", "string"),
    ([{"role": "user"}], "messages[0].content", "missing"),
    ([{"role": "assistant", "content": None, "tool_calls": [{"function": {"arguments": "{}"}}]}],
     "messages[0].tool_calls[0].function.name", "name"),
])
def test_bad_messages_are_request_errors_naming_the_field(messages, param, words):
    with pytest.raises(RequestError) as caught:
        lower_messages(messages, [])
    assert caught.value.status == 400 and caught.value.param == param and words in caught.value.message


# ------------------------------------------------------------------------------ end to end


def test_chat_returns_ids_and_logprobs_identical_to_the_store_and_the_engine(client, server, store, model, tokenizer):
    response = client.chat.completions.create(
        model="anything", messages=USER, temperature=0, max_tokens=6, logprobs=True,
        extra_body={"return_token_ids": True}, extra_headers={"X-Rollout-Id": "chat-1"})
    data = response.to_dict()
    choice = data["choices"][0]
    assert data["model"] == "tiny" and data["brainforge"] == {**data["brainforge"], "rollout_id": "chat-1", "call_indices": [0]}
    prompt_ids, token_ids = data["prompt_token_ids"], choice["token_ids"]
    assert prompt_ids == encode_prompt(tokenizer, tokenizer.chat_template, USER, [])
    logprobs = [entry["logprob"] for entry in choice["logprobs"]["content"]]
    assert len(token_ids) == len(logprobs) == data["usage"]["completion_tokens"] == 6
    assert choice["finish_reason"] == "length" and choice["message"]["content"] == tokenizer.decode(token_ids, skip_special_tokens=True)
    [call] = store.calls("chat-1")
    assert (call.prompt_ids, call.completion_ids, call.logprobs) == (prompt_ids, token_ids, logprobs)
    assert call.params["temperature"] == 0 and call.params["max_tokens"] == 6 and call.messages == USER
    # The sampling log-probs are the model's (greedy: the untempered distribution), not recomputed text.
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + token_ids])).logits[0, len(prompt_ids) - 1:-1]
    expected = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(token_ids)[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor(logprobs), expected, atol=1e-4, rtol=1e-4)
    # The metadata field names the rollout too; the store indexes calls per rollout.
    client.chat.completions.create(model="x", messages=USER, max_tokens=2, metadata={"rollout_id": "chat-1"})
    assert [c.index for c in store.calls("chat-1")] == [0, 1]


def test_n_choices_are_one_engine_call_and_one_record_each(client, server, store):
    before = server.stats["engine_calls"]
    response = client.chat.completions.create(model="x", messages=USER, n=3, max_tokens=4, temperature=1.0,
                                              extra_headers={"X-Rollout-Id": "n-3"})
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert response.to_dict()["brainforge"]["call_indices"] == [0, 1, 2]
    assert server.stats["engine_calls"] == before + 1 and server.stats["batch_sizes"][-1] == 3
    assert [c.params["n"] for c in store.calls("n-3")] == [3, 3, 3]


def test_stop_strings_end_the_completion_and_are_left_out_of_the_content(client):
    # The tiny random model answers this prompt greedily with newlines only (checked below).
    free = client.chat.completions.create(model="x", messages=USER, temperature=0, max_tokens=8, extra_body={"return_token_ids": True})
    assert free.choices[0].finish_reason == "length" and free.choices[0].message.content == "\n" * 8
    stopped = client.chat.completions.create(model="x", messages=USER, temperature=0, max_tokens=8, stop=["\n\n", "zzz"],
                                             extra_body={"return_token_ids": True})
    choice = stopped.to_dict()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["content"] == ""
    assert choice["token_ids"] == free.to_dict()["choices"][0]["token_ids"][:2]  # the ids keep what was sampled


def test_tools_and_tool_messages_render_into_the_prompt_and_are_recorded(client, store, tokenizer):
    call = {"id": "call_abc", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
    messages = [{"role": "user", "content": "What is 1+2?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_abc", "content": "3"}]
    response = client.chat.completions.create(model="x", messages=messages, tools=[ADD_TOOL], max_tokens=4, temperature=0,
                                              extra_body={"return_token_ids": True}, extra_headers={"X-Rollout-Id": "tools-1"})
    prompt = tokenizer.decode(response.to_dict()["prompt_token_ids"])
    assert '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>' in prompt
    assert "<|im_start|>tool\n3<|im_end|>" in prompt and '"description": "Add two integers."' in prompt
    [record] = store.calls("tools-1")
    assert record.tools == [ADD_TOOL] and record.messages == messages
    assert "</tool_call>" not in record.params["stop"]  # the server's own stop string is not the user's
    # tool_choice "none": the tools are not offered.
    plain = client.chat.completions.create(model="x", messages=messages, tools=[ADD_TOOL], tool_choice="none", max_tokens=2,
                                           extra_body={"return_token_ids": True})
    assert "<tools>" not in tokenizer.decode(plain.to_dict()["prompt_token_ids"])


class ScriptedEngine:
    """Stands in for the generation engine to make the model 'write' a tool call: a random
    tiny model never does. Records the sampling parameters it was given."""

    def __init__(self, tokenizer, text: str):
        self.ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        self.params = []

    def generate(self, prompts, counts, params):
        self.params.append(params)
        rows = sum(counts)
        ids = torch.tensor([self.ids] * rows)
        return Rollout(prompt_ids=[p for p, c in zip(prompts, counts) for _ in range(c)], completion_ids=ids,
                       completion_mask=torch.ones_like(ids), truncated=torch.zeros(rows, dtype=torch.bool),
                       texts=["Adding. " + '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'] * rows,
                       logprobs=torch.full(ids.shape, -0.5))


def test_a_written_tool_call_reaches_the_client_as_tool_calls_and_forced_sampling_wins(model, tokenizer, store):
    settings = PolicyServerSettings(max_tokens=16, batch_wait_ms=0)
    with PolicyServer(model, tokenizer, tokenizer.chat_template, settings, store, forced_sampling=(0.7, 0.9)) as policy:
        policy.engine = ScriptedEngine(tokenizer, 'Adding. <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>')
        client = openai.OpenAI(base_url=policy.base_url, api_key="unused", max_retries=0, timeout=300)
        response = client.chat.completions.create(model="x", messages=USER, tools=[ADD_TOOL], temperature=0, top_p=1.0,
                                                  extra_headers={"X-Rollout-Id": "scripted"})
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Adding."
    [call] = choice.message.tool_calls
    assert call.function.name == "add" and json.loads(call.function.arguments) == {"a": 1, "b": 2}
    used = policy.engine.params[-1]
    assert (used.temperature, used.top_p) == (0.7, 0.9) and "</tool_call>" in used.stop_strings
    [record] = store.calls("scripted")
    assert record.tool_calls == [call.model_dump()] and record.finish_reason == "tool_calls"
    assert record.params["forced"] is True and record.params["temperature"] == 0.7


def test_forced_sampling_applies_to_rollout_calls_only(model, tokenizer, store):
    """APO's optimiser shares the server with the agent: its critiques (no rollout id) keep
    their own temperature while the agent's calls are sampled as the run says."""
    settings = PolicyServerSettings(max_tokens=16, batch_wait_ms=0)
    with PolicyServer(model, tokenizer, tokenizer.chat_template, settings, store, forced_sampling=(0.0, 1.0)) as policy:
        policy.engine = ScriptedEngine(tokenizer, "A critique.")
        client = openai.OpenAI(base_url=policy.base_url, api_key="unused", max_retries=0, timeout=300)
        client.chat.completions.create(model="x", messages=USER, temperature=0.7, top_p=0.8)
        free = policy.engine.params[-1]
        client.chat.completions.create(model="x", messages=USER, temperature=0.7, top_p=0.8, extra_headers={"X-Rollout-Id": "r"})
        forced = policy.engine.params[-1]
    assert (free.temperature, free.top_p) == (0.7, 0.8)
    assert (forced.temperature, forced.top_p) == (0.0, 1.0)
    assert store.calls("r")[0].params["forced"] is True


def test_concurrent_clients_share_decode_batches(client, server):
    clients, barrier = 6, threading.Barrier(6)
    answers: list = [None] * clients
    before = server.stats

    def ask(i: int) -> None:
        barrier.wait(timeout=120)
        answers[i] = client.chat.completions.create(model="x", messages=[{"role": "user", "content": f"Question {i}"}],
                                                    temperature=0, max_tokens=4)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert all(a is not None and len(a.choices) == 1 for a in answers)
    after = server.stats
    calls = after["engine_calls"] - before["engine_calls"]
    assert after["requests"] - before["requests"] == clients
    assert calls < clients and max(after["batch_sizes"][len(before["batch_sizes"]):]) > 1, after


def test_streaming_sends_openai_chunks(client):
    chunks = list(client.chat.completions.create(model="x", messages=USER, temperature=0, max_tokens=3, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "\n" * 3 and [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("body, param, words", [
    (b"{not json", None, "not valid JSON"),
    ([1, 2], None, "JSON object"),
    ({"model": "x"}, "messages", "required"),
    ({"messages": []}, "messages", "empty"),
    ({"messages": {"role": "user"}}, "messages", "list"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "robot"),
    ({"messages": USER, "n": 0}, "n", ">= 1"),
    ({"messages": USER, "n": "2"}, "n", "integer"),
    ({"messages": USER, "temperature": -1}, "temperature", ">= 0"),
    ({"messages": USER, "top_p": 0}, "top_p", "(0, 1]"),
    ({"messages": USER, "max_tokens": 0}, "max_tokens", ">= 1"),
    ({"messages": USER, "stop": [""]}, "stop", "non-empty"),
    ({"messages": USER, "tools": [{"type": "function"}]}, "tools[0]", "function"),
    ({"messages": USER, "tool_choice": "sometimes"}, "tool_choice", "auto"),
    ({"messages": USER, "top_logprobs": 3}, "top_logprobs", "sampled token"),
    ({"messages": USER, "n": 17}, "n", "max_batch_size"),
    ({"messages": USER, "metadata": {"rollout_id": ""}}, "metadata.rollout_id", "rollout id"),
])
def test_malformed_requests_get_openai_errors(server, body, param, words):
    assert_openai_error(post(server, "/chat/completions", body), 400, param, words)


def test_unknown_routes_and_unexpected_failures_are_openai_errors_not_tracebacks(server, client, monkeypatch):
    assert_openai_error(httpx.get(server.base_url + "/nope", timeout=60), 404)
    with pytest.raises(openai.BadRequestError):  # through the client too
        client.chat.completions.create(model="x", messages=USER, temperature=-1)

    def broken(*args, **kwargs):
        raise RuntimeError("boom\nwith a second line")

    monkeypatch.setattr(server.engine, "generate", broken)
    error = assert_openai_error(post(server, "/chat/completions", {"messages": USER}), 500, words="RuntimeError")
    assert error["type"] == "server_error"
    monkeypatch.undo()
    assert client.chat.completions.create(model="x", messages=USER, max_tokens=1).choices  # the worker survived


def test_requests_over_the_context_length_are_refused_with_the_counts(server, client, store):
    long = [{"role": "user", "content": "word " * 1100}]
    error = assert_openai_error(post(server, "/chat/completions", {"messages": long}), 400, "messages", "context length of 1024")
    assert error["code"] == "context_length_exceeded"
    near = [{"role": "user", "content": "word " * 990}]
    error = assert_openai_error(post(server, "/chat/completions", {"messages": near, "max_tokens": 16}), 400, "messages", "1024")
    assert "16 for the completion" in error["message"]
    # max_tokens above the server's cap is clipped, and the record says so.
    response = client.chat.completions.create(model="x", messages=USER, max_tokens=5000, temperature=0,
                                              extra_headers={"X-Rollout-Id": "clipped"})
    assert response.usage.completion_tokens == 16
    params = store.calls("clipped")[0].params
    assert (params["max_tokens"], params["max_tokens_requested"]) == (16, 5000)


def test_finished_rollouts_refuse_calls_and_rewards_are_recorded(server, client, store):
    client.chat.completions.create(model="x", messages=USER, max_tokens=1, extra_headers={"X-Rollout-Id": "done-1"})
    assert post(server, "/rollouts/done-1/reward", {"reward": 0.25, "call_index": 0}).status_code == 200
    assert post(server, "/rollouts/done-1/finish", {"status": "succeeded", "reward": 1.0}).status_code == 200
    with pytest.raises(openai.ConflictError):
        client.chat.completions.create(model="x", messages=USER, max_tokens=1, extra_headers={"X-Rollout-Id": "done-1"})
    assert_openai_error(post(server, "/chat/completions", {"messages": USER, "metadata": {"rollout_id": "done-1"}}), 409,
                        words="finished")
    rollout = store.get_rollout("done-1")
    assert (rollout.status, rollout.reward, len(rollout.calls), rollout.calls[0].reward) == ("succeeded", 1.0, 1, 0.25)
    assert_openai_error(post(server, "/rollouts/done-1/finish", {"status": "failed"}), 409)
    assert_openai_error(post(server, "/rollouts/never-seen/reward", {"reward": 1}), 404, words="never-seen")
    assert_openai_error(post(server, "/rollouts/done-1/reward", {"reward": "high"}), 400, "reward")
    assert_openai_error(post(server, "/rollouts/done-1/finish", {"status": "great"}), 400, "status")


def test_api_key_is_required_when_configured(model, tokenizer, monkeypatch):
    settings = PolicyServerSettings(api_key_env="BRAINFORGE_TEST_KEY", batch_wait_ms=0, max_tokens=2)
    with pytest.raises(BrainforgeError, match="BRAINFORGE_TEST_KEY"):
        PolicyServer(model, tokenizer, tokenizer.chat_template, settings, None)  # named but unset: refused, not open
    monkeypatch.setenv("BRAINFORGE_TEST_KEY", "s3cret")
    with PolicyServer(model, tokenizer, tokenizer.chat_template, settings, None) as policy:
        assert policy.base_url.startswith("http://127.0.0.1:")
        for key in ("wrong", "s3cretX"):
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=policy.base_url, api_key=key, max_retries=0).models.list()
        assert_openai_error(httpx.get(policy.base_url + "/models", timeout=60), 401)
        good = openai.OpenAI(base_url=policy.base_url, api_key="s3cret", max_retries=0, timeout=300)
        assert [m.id for m in good.models.list()] == ["brainforge"]
        assert good.chat.completions.create(model="x", messages=USER, max_tokens=2).usage.completion_tokens == 2
        assert httpx.get(policy.base_url.removesuffix("/v1") + "/health", timeout=60).json()["status"] == "ok"


def test_a_port_in_use_is_a_clear_error(model, tokenizer):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        settings = PolicyServerSettings(port=taken.getsockname()[1])
        policy = PolicyServer(model, tokenizer, tokenizer.chat_template, settings, None)
        with pytest.raises(BrainforgeError, match="could not listen"):
            policy.start()
        policy.stop()


def test_brainforge_serve_refuses_an_unset_key_variable_before_loading(tiny_model_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from brainforge.cli import app

    monkeypatch.delenv("BRAINFORGE_UNSET_KEY", raising=False)
    result = CliRunner().invoke(app, ["serve", "--model", str(tmp_path / "no-such-model"), "--api-key-env", "BRAINFORGE_UNSET_KEY",
                                      "--store", str(tmp_path / "t.sqlite")])
    assert isinstance(result.exception, BrainforgeError) and "BRAINFORGE_UNSET_KEY" in str(result.exception)
    assert not (tmp_path / "t.sqlite").exists()  # refused before anything was opened or loaded


@pytest.mark.slow
def test_brainforge_serve_serves_records_and_stops_on_ctrl_c(tiny_model_dir, tmp_path):
    import os
    import queue
    import signal
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    store_path = tmp_path / "serve.sqlite"
    process = subprocess.Popen([sys.executable, "-m", "brainforge", "serve", "--model", str(tiny_model_dir), "--port", "0",
                                "--store", str(store_path), "--max-tokens", "3"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True)
    reader.start()
    try:
        seen = []
        while not any(line.startswith("Serving") for line in seen):
            seen.append(lines.get(timeout=300))  # generous: imports and model loading on a busy machine
        base_url = next(line for line in seen if line.startswith("Serving")).split(" at ")[1].split()[0]
        assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1")
        client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=300)
        answer = client.chat.completions.create(model="x", messages=USER, extra_headers={"X-Rollout-Id": "cli-1"})
        assert answer.usage.completion_tokens <= 3
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=60)
    reader.join(timeout=60)
    with TraceStore(store_path) as traces:
        assert len(traces.calls("cli-1")) == 1
