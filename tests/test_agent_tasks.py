"""The bundled tool task set (`agent:tools`): disjoint deterministic splits, answers that are
right (recomputed independently), bundled files that match their generator, and the reward."""

import configparser
import copy
import re
from pathlib import Path

import pytest

from brainforge.agents import tasks as agent_tasks
from brainforge.agents.tasks import TASK_DATA, agent_task_reward, task_reward, tool_tasks
from brainforge.agents.tools import read_file_under
from brainforge.config import SourceConfig
from brainforge.data.prompts import load_prompts
from brainforge.errors import DataError


def load(split, **options):
    return load_prompts([SourceConfig(name="agent:tools", type="prompt", split=split, options=options)], None)


def test_splits_are_large_enough_disjoint_and_deterministic():
    splits = {split: load(split) for split in ("train", "validation", "test")}
    assert len(splits["train"]) >= 200 and len(splits["validation"]) >= 32 and len(splits["test"]) >= 64
    questions = {split: [e.text for e in examples] for split, examples in splits.items()}
    for split, texts in questions.items():
        assert len(set(texts)) == len(texts), split
    assert not set(questions["train"]) & set(questions["validation"])
    assert not set(questions["train"]) & set(questions["test"])
    assert not set(questions["validation"]) & set(questions["test"])
    assert [e.text for e in load("test")] == questions["test"]
    # read_file questions are split by file: no held-out file is read in training
    files = {split: {m.group(0) for t in texts for m in [re.search(r"configs/service_\d+\.ini", t)] if m}
             for split, texts in questions.items()}
    assert not files["train"] & (files["validation"] | files["test"]) and not files["validation"] & files["test"]
    for examples in splits.values():
        assert {e.columns["kind"] for e in examples} == {"calculator", "read_file", "python"}
        assert len({e.columns["task_id"] for e in examples}) == len(examples)
        for example in examples:
            assert example.messages[0]["role"] == "user" and "Reply with just the" in example.text
            assert example.columns["tools"] == [{"calculator": "calculator", "read_file": "read_file",
                                                 "python": "python"}[example.columns["kind"]]]
            assert example.columns["root"] == str(TASK_DATA)


def test_calculator_answers_are_right():
    checked = 0
    for split in ("train", "validation", "test"):
        for task in tool_tasks(split, ["calculator"]):
            m = re.match(r"What is (\d+) \* (\d+)( - (\d+))?\?", task["question"]) or re.match(r"What is (\d+) / (\d+)\?", task["question"])
            numbers = [int(g) for g in m.groups() if g and not g.startswith(" ")]
            if "/" in task["question"]:
                assert numbers[0] % numbers[1] == 0 and task["answer"] == str(numbers[0] // numbers[1])
            else:
                expected = numbers[0] * numbers[1] - (numbers[2] if len(numbers) == 3 else 0)
                assert task["answer"] == str(expected)
            assert all(100 <= n for n in numbers)
            checked += 1
    assert checked == 150


def test_python_answers_are_right():
    def is_prime(n):
        return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))

    for task in tool_tasks("validation", ["python"]) + tool_tasks("test", ["python"]):
        if m := re.match(r"What is the sum of the digits of (\d+)\*\*(\d+)\?", task["question"]):
            assert task["answer"] == str(sum(int(d) for d in str(int(m[1]) ** int(m[2]))))
        else:
            limit = int(re.match(r"How many prime numbers are there below (\d+)\?", task["question"])[1])
            assert task["answer"] == str(sum(1 for n in range(limit) if is_prime(n)))


def test_read_file_answers_come_from_the_bundled_files():
    for task in tool_tasks("test", ["read_file"]):
        path, key = re.search(r"configs/service_\d+\.ini", task["question"])[0], task["question"].split()[3]
        text = read_file_under(Path(task["root"]), path)  # what the agent's tool would read
        parser = configparser.ConfigParser()
        parser.read_string(text)
        assert parser["service"][key] == task["answer"]


def test_bundled_files_match_their_generator_and_are_package_data(tmp_path):
    agent_tasks.write_task_data(tmp_path)
    generated = sorted(p.name for p in (tmp_path / "configs").iterdir())
    bundled = sorted(p.name for p in (TASK_DATA / "configs").iterdir())
    assert generated == bundled and len(bundled) == agent_tasks.SERVICE_FILES
    for name in bundled:
        assert (TASK_DATA / "configs" / name).read_text() == (tmp_path / "configs" / name).read_text(), name
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert '"agents/task_data/configs/*.ini"' in pyproject


def test_kinds_option_and_bad_options_are_named():
    assert {e.columns["kind"] for e in load("train", kinds=["calculator"])} == {"calculator"}
    with pytest.raises(DataError, match="options.kinds"):
        load("train", kinds=["chess"])
    with pytest.raises(DataError, match="unknown option"):
        load("train", size=10)
    with pytest.raises(DataError, match="split 'dev'"):
        load("dev")
    with pytest.raises(DataError, match="agent:tools"):
        load_prompts([SourceConfig(name="agent:chess", type="prompt")], None)


@pytest.mark.parametrize("reply, answer, reward", [
    ("1817517", "1817517", 1.0),
    ("The answer is 1,817,517.", "1817517", 1.0),
    ("1817517.0", "1817517", 1.0),
    ("4821 * 377 = 1817517", "1817517", 1.0),
    ("-14", "-14", 1.0),
    ("14", "-14", 0.0),
    ("18175170", "1817517", 0.0),               # whole token only
    ("1817517.5", "1817517", 0.0),
    ("The port in configs/service_7.ini is 8707.", "8707", 1.0),
    ("service_8707", "8707", 0.0),
    ("Maybe 12, 13, 14 or 15", "14", 0.0),      # listing candidates earns nothing
    ("I don't know", "42", 0.0),
    ("", "42", 0.0),
    (None, "42", 0.0),
    ("The release is 3vcv-2kvu.", "3VCV-2KVU", 1.0),
    ("X3VCV-2KVU", "3VCV-2KVU", 0.0),
    ("3VCV-2KVU-1", "3VCV-2KVU", 0.0),
])
def test_task_reward(reply, answer, reward):
    assert task_reward(reply, {"answer": answer}) == reward


def test_task_reward_from_config_by_name():
    from brainforge.rewards.registry import resolve_reward

    function = resolve_reward("agent_task")
    assert function(["q1", "q2", "q3"], ["42", "41", "x"], answer=["42", "42", None]) == [1.0, 0.0, None]


# -- the agents, against a scripted client ---------------------------------------------------------
class ScriptedClient:
    """Answers chat.completions.create with the next scripted message (OpenAI SDK objects)
    and keeps every request, as the real client pointed at the policy server would."""

    def __init__(self, replies):
        self.replies, self.requests = list(replies), []
        self.chat = self
        self.completions = self

    def create(self, **request):
        from openai.types.chat import ChatCompletion

        self.requests.append(copy.deepcopy(request))  # the real client serialises at call time
        message = self.replies.pop(0)
        return ChatCompletion.model_validate({
            "id": "x", "object": "chat.completion", "created": 0, "model": "policy",
            "choices": [{"index": 0, "finish_reason": "tool_calls" if message.get("tool_calls") else "stop",
                         "message": {"role": "assistant", **message}}]})


def tool_reply(name, arguments):
    return {"content": None, "tool_calls": [{"id": "call_1", "type": "function",
                                             "function": {"name": name, "arguments": arguments}}]}


def test_default_agent_runs_the_tool_then_scores_the_final_reply():
    from brainforge.agents.tool_agent import solve

    task = {"prompt": "What is 4821 * 377? Reply with just the number.", "answer": "1817517",
            "tools": ["calculator"], "root": str(TASK_DATA), "kind": "calculator"}
    client = ScriptedClient([tool_reply("calculator", '{"expression": "4821 * 377"}'), {"content": "1817517"}])
    assert solve(task, client, prompt="Be brief.") == 1.0
    first, second = client.requests
    system, *examples, question = first["messages"]
    assert first["model"] == "policy" and system == {"role": "system", "content": "Be brief."}
    # worked examples of the task's tools come first, as earlier turns: question, call, result, answer
    assert [m["role"] for m in examples] == ["user", "assistant", "tool", "assistant"] * 3
    assert examples[1]["tool_calls"][0]["function"] == {"name": "calculator", "arguments": '{"expression": "123 * 456"}'}
    assert examples[2]["content"] == "56088" and question == {"role": "user", "content": task["prompt"]}
    assert [t["function"]["name"] for t in first["tools"]] == ["calculator"]
    assistant, tool = second["messages"][len(first["messages"]):]
    assert assistant["tool_calls"][0]["function"] == {"name": "calculator", "arguments": '{"expression": "4821 * 377"}'}
    assert tool == {"role": "tool", "tool_call_id": "call_1", "content": "1817517"}


def test_default_agent_reads_files_feeds_back_errors_and_gives_up_after_max_turns():
    from brainforge.agents import tool_agent

    task = tool_tasks("test", ["read_file"])[0]
    task["prompt"] = task.pop("question")
    client = ScriptedClient([tool_reply("read_file", '{"path": "../../../etc/passwd"}'),
                             tool_reply("read_file", '{"path": "%s"}' % re.search(r"configs/\S+\.ini", task["prompt"])[0]),
                             {"content": f"It is {task['answer']}."}])
    assert tool_agent.solve(task, client) == 1.0
    assert client.requests[1]["messages"][-1]["content"].startswith("error: ")
    assert client.requests[0]["messages"][0]["content"] == tool_agent.default_prompt()
    assert client.requests[0]["messages"][1:-1] == tool_agent.example_turns(["read_file"])
    looping = ScriptedClient([tool_reply("calculator", "{oops")] * tool_agent.MAX_TURNS)
    task = {"prompt": "2*3?", "answer": "6", "tools": ["calculator"]}
    assert tool_agent.solve(task, looping) == 0.0
    assert "not valid JSON" in looping.requests[-1]["messages"][-1]["content"]


def test_client_errors_propagate_to_the_runner():
    from brainforge.agents.tool_agent import solve

    class Failing:
        def __init__(self):
            self.chat = self.completions = self

        def create(self, **request):
            raise ConnectionError("server down")

    with pytest.raises(ConnectionError):
        solve({"prompt": "2*3?", "answer": "6", "tools": ["calculator"]}, Failing())


def test_example_agent_is_plain_openai_and_solves_with_its_own_calculator():
    import importlib.util

    path = Path(__file__).parents[1] / "examples" / "calculator_agent.py"
    assert "brainforge" not in "".join(l for l in path.read_text().splitlines(True) if l.startswith(("import", "from")))
    spec = importlib.util.spec_from_file_location("calculator_agent_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    client = ScriptedClient([tool_reply("calculator", '{"expression": "4821 * 377"}'), {"content": "1,817,517"}])
    assert module.solve({"prompt": "What is 4821 * 377?", "answer": "1817517"}, client) == 1.0
    assert client.requests[1]["messages"][-1]["content"] == "1817517"
    assert module.calculator("9**9**9").startswith("error")
    assert module.calculator("__import__('os')").startswith("error")


def test_max_samples_limits_the_training_tasks_not_the_held_out_ones(tmp_path):
    """`brainforge eval` and APO's validation/test judge on the whole held-out split even when
    the config trains on a few tasks (agent_sft's `max_samples`)."""
    from brainforge.agents.run import agent_tasks
    from brainforge.config import load_config

    path = tmp_path / "config.yaml"
    path.write_text('data: {source: {name: "agent:tools", type: prompt, split: train, max_samples: 5}}\n'
                    "algorithm: {name: agent_sft}\ntraining: {num_epochs: 1}\n")
    config = load_config(path)
    assert len(agent_tasks(config)) == 5
    assert len(agent_tasks(config, "test")) == len(tool_tasks("test")) == 96
    assert len(agent_tasks(config, "validation")) == len(tool_tasks("validation"))
