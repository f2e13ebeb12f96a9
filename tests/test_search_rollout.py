"""Search-R1 rollouts (ALGORITHMS.md sections 5 and 7): multi-turn sampling with search calls,
state masking, budgets, and a search tool that fails.

Two kinds of policy: a scripted engine (its turns are given as text, so every branch of the
loop can be reached on purpose) and the tiny random Llama (real sampling, for the property
that matters most: the log-probs the loss pass computes for the policy's own tokens, in one
packed sequence with the observations in between, equal those of incremental generation)."""

from __future__ import annotations

import math

import pytest
import torch

from brainforge.config import GRPOSettings, SearchSettings, TrainingConfig
from brainforge.data.prompts import PromptExample
from brainforge.data.templates import chat_format
from brainforge.generation.engine import GenerationEngine, Rollout, SamplingParams, chat_stop_ids
from brainforge.reasoning.rollout import search_rollout
from brainforge.rl.losses import StepTotals, loss_pass

PARAMS = SamplingParams(max_new_tokens=64, temperature=1.0)


class ScriptedEngine:
    """Stands in for GenerationEngine: `reply(transcript_so_far) -> text` writes each turn.
    Honours the turn budget (truncating) and the stop strings (cutting after the first)."""

    def __init__(self, tokenizer, reply):
        self.tokenizer = tokenizer
        self.reply = reply
        self.stop_token_ids = torch.tensor(chat_stop_ids(tokenizer))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.calls: list[int] = []
        self.prompt_length = 0

    def generate(self, prompts, num_samples, params, generator=None):
        counts = [num_samples] * len(prompts) if isinstance(num_samples, int) else list(num_samples)
        rows = [p for p, c in zip(prompts, counts) for _ in range(c)]
        self.calls.append(len(rows))
        outs, truncated = [], []
        for ids in rows:
            transcript = self.tokenizer.decode(ids[self.prompt_length:], skip_special_tokens=True)
            text = self.reply(transcript)
            for stop in params.stop_strings:
                if stop in text:
                    text = text[: text.index(stop) + len(stop)]
            new = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            truncated.append(len(new) > params.max_new_tokens)
            outs.append(new[: params.max_new_tokens])
        width = max(1, max(len(o) for o in outs))
        completion = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, o in enumerate(outs):
            completion[r, : len(o)] = torch.tensor(o, dtype=torch.long)
            mask[r, : len(o)] = 1
        logps = torch.full((len(rows), width), -0.5) * mask
        return Rollout(prompt_ids=rows, completion_ids=completion, completion_mask=mask, truncated=torch.tensor(truncated),
                       texts=[self.tokenizer.decode(o) for o in outs], logprobs=logps,
                       stats={"decode_row_steps": 0.0, "completion_tokens": float(sum(map(len, outs)))})


def run(tokenizer, reply, search, samples=2, **settings):
    engine = ScriptedEngine(tokenizer, reply)
    prompt = tokenizer("Question: what is the capital of Bhutan?", add_special_tokens=False)["input_ids"]
    engine.prompt_length = len(prompt)
    rollout = search_rollout(engine, [prompt], samples, PARAMS, search, SearchSettings(**settings))
    return rollout, engine


def observed_text(tokenizer, rollout, row):
    ids = rollout.completion_ids[row][rollout.observation_mask[row]]
    return tokenizer.decode(ids, skip_special_tokens=True)


def policy_text(tokenizer, rollout, row):
    keep = rollout.observation_mask[row].logical_not() & rollout.completion_mask[row].bool()
    return tokenizer.decode(rollout.completion_ids[row][keep], skip_special_tokens=True)


# --------------------------------------------------------------------------- the loop


def test_search_then_answer_appends_results_as_masked_tokens(tokenizer):
    queries_seen = []

    def search(queries):
        queries_seen.append(list(queries))
        return [["Thimphu is the capital of Bhutan.", "Bhutan uses the ngultrum."] for _ in queries]

    def reply(transcript):
        if "<context>" not in transcript:
            return "<think> look it up </think> <search> capital of Bhutan </search> trailing text"
        return "<think> found it </think> <answer> Thimphu </answer> and more"

    rollout, engine = run(tokenizer, reply, search)
    assert engine.calls == [2, 2]                                   # both rows in one batch per turn
    assert queries_seen == [["capital of Bhutan"]]                  # identical queries searched once, in one call
    for row in range(2):
        log = rollout.search_logs[row]
        assert log.search_calls == 1 and log.answered and log.ended == "answer" and log.queries == ["capital of Bhutan"]
        text = rollout.texts[row]
        assert text.index("</search>") < text.index("<context>") < text.index("[1] Thimphu") < text.index("</context>") < text.index("<answer>")
        assert "trailing text" not in text and "and more" not in text   # turns are cut at the stop strings
        observed = observed_text(tokenizer, rollout, row)
        assert observed.strip().startswith("<context>") and observed.strip().endswith("</context>") and "[2] Bhutan uses" in observed
        assert "<search>" not in observed and "<answer>" not in observed
        assert "<search> capital of Bhutan </search>" in policy_text(tokenizer, rollout, row)
        policy = ~rollout.observation_mask[row] & rollout.completion_mask[row].bool()
        assert torch.all(rollout.logprobs[row][rollout.observation_mask[row]] == 0)
        assert torch.all(rollout.logprobs[row][policy] == -0.5)     # the sampler's log-probs, carried over
    assert not rollout.truncated.any()


def test_invalid_action_gets_a_corrective_observation_and_counts_against_the_budget(tokenizer):
    turns = iter(["I think it is Thimphu.", "<search></search>", "<answer> Thimphu </answer>"] * 2)

    rollout, _ = run(tokenizer, lambda transcript: next(turns), lambda q: [["x"] for _ in q], samples=1, max_search_calls=3)
    log = rollout.search_logs[0]
    assert log.invalid_actions == 2 and log.search_calls == 0 and log.answered
    observed = observed_text(tokenizer, rollout, 0)
    assert observed.count("Invalid action") == 2 and "empty <search> block" in observed


def test_max_search_calls_then_a_final_turn_without_search(tokenizer):
    calls = []

    def search(queries):
        calls.append(queries)
        return [["nothing useful"] for _ in queries]

    rollout, engine = run(tokenizer, lambda t: "<search> again </search>", search, samples=1, max_search_calls=2)
    log = rollout.search_logs[0]
    assert log.search_calls == 2 and len(calls) == 2                # the third search is never executed
    assert log.ended == "final_turn" and not log.answered
    assert engine.calls == [1, 1, 1]                                 # two searching turns + the final turn

    # The final turn may still answer.
    answers = iter(["<search> q1 </search>", "<answer> Thimphu </answer>"])
    rollout, _ = run(tokenizer, lambda t: next(answers), search, samples=1, max_search_calls=1)
    assert rollout.search_logs[0].answered and rollout.search_logs[0].search_calls == 1


def test_total_token_cap_truncates_the_rollout(tokenizer):
    long_results = [" ".join(["word"] * 400)]
    rollout, _ = run(tokenizer, lambda t: "<search> more </search>", lambda q: [long_results for _ in q], samples=1,
                     max_search_calls=10, max_turn_tokens=16, max_observation_tokens=100, max_total_tokens=200)
    log = rollout.search_logs[0]
    assert rollout.completion_mask[0].sum() <= 200
    assert log.ended == "total_cap" and bool(rollout.truncated[0])
    observed = observed_text(tokenizer, rollout, 0)
    assert observed.count("<context>") == observed.count("</context>") >= 1   # every observation closed, even when cut


def test_turn_cap_cuts_a_long_turn(tokenizer):
    rollout, _ = run(tokenizer, lambda t: "blah " * 100, lambda q: [["x"] for _ in q], samples=1,
                     max_search_calls=1, max_turn_tokens=8)
    log = rollout.search_logs[0]
    assert log.invalid_actions == 1 and log.ended == "final_turn" and bool(rollout.truncated[0])
    policy = (~rollout.observation_mask[0] & rollout.completion_mask[0].bool()).sum()
    assert policy <= 16                                              # two turns of at most 8 tokens


def test_a_search_tool_that_raises_mid_rollout_closes_the_tag_and_goes_on(tokenizer):
    state = {"calls": 0}

    def flaky(queries):
        state["calls"] += 1
        if state["calls"] == 2:
            raise ConnectionError("index offline")
        return [["Thimphu is the capital."] for _ in queries]

    def reply(transcript):
        n = transcript.count("<context>")
        return "<search> capital </search>" if n < 2 else "<answer> Thimphu </answer>"

    rollout, _ = run(tokenizer, reply, flaky, samples=2, max_search_calls=3)
    for row in range(2):
        log = rollout.search_logs[row]
        assert log.search_calls == 2 and log.failed_searches == 1 and log.answered
        observed = observed_text(tokenizer, rollout, row)
        assert "The search failed: ConnectionError" in observed and observed.count("</context>") == 2
    # A tool that returns the wrong number of lists, or empty results, is handled the same way.
    rollout, _ = run(tokenizer, reply, lambda q: [], samples=1)
    assert rollout.search_logs[0].failed_searches == 2
    rollout, _ = run(tokenizer, reply, lambda q: [[] for _ in q], samples=1)
    assert rollout.search_logs[0].empty_searches == 2 and "No results." in observed_text(tokenizer, rollout, 0)


def test_end_of_turn_without_an_answer_ends_the_rollout(tokenizer):
    eos = tokenizer.convert_ids_to_tokens(chat_stop_ids(tokenizer)[0])
    rollout, engine = run(tokenizer, lambda t: f"I do not know.{eos}", lambda q: [["x"] for _ in q], samples=1)
    assert rollout.search_logs[0].ended == "end_of_turn" and not rollout.search_logs[0].answered
    assert engine.calls == [1] and not rollout.observation_mask.any()


# --------------------------------------------------------------------------- real sampling, packed log-probs, masks


@pytest.fixture(scope="module")
def search_module(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from brainforge.config import LoraSettings
    from brainforge.models.loader import attach_lora
    from brainforge.training.grpo import GRPOModule

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    policy = attach_lora(base, LoraSettings(r=4, lora_alpha=8, lora_dropout=0.0))
    torch.manual_seed(1)
    for name, param in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.3)
    settings = GRPOSettings(num_generations=3, prompts_per_step=1, max_new_tokens=8, temperature=1.0, beta=0.05,
                            reward_functions=[{"name": "exact_match"}])
    return GRPOModule(policy, tokenizer, chat_format("chatml", tokenizer).template, settings, TrainingConfig(max_steps=1), 1)


def real_rollout(module, seed=0):
    """The tiny random model never writes a valid action: every turn is cut at the turn
    budget and gets a corrective observation, so transcripts interleave policy and
    environment tokens several times."""
    prompt = module.encode_prompt(PromptExample([{"role": "user", "content": "What is the capital of Bhutan?"}]))
    settings = SearchSettings(max_search_calls=2, max_turn_tokens=6, max_observation_tokens=12, max_total_tokens=120)
    params = SamplingParams(max_new_tokens=6, temperature=1.0)
    return search_rollout(module.engine, [prompt], 3, params, lambda q: [["x"] for _ in q], settings,
                          torch.Generator().manual_seed(seed))


def test_packed_logps_of_own_tokens_equal_incremental_generation(search_module):
    rollout = real_rollout(search_module)
    policy = rollout.completion_mask.bool() & ~rollout.observation_mask
    assert rollout.observation_mask.any(dim=1).sum() >= 2              # observations between turns, in several rows
    assert policy.sum() > 0
    with torch.no_grad():
        packed, _ = search_module.completion_logps(rollout, grad=False)
    torch.testing.assert_close(packed[policy], rollout.logprobs[policy], atol=2e-4, rtol=1e-4)


def test_observation_tokens_are_attended_but_outside_loss_kl_and_entropy(search_module):
    module = search_module
    rollout = real_rollout(module, seed=1)
    observed = rollout.observation_mask
    mask = module.loss_mask(rollout, torch.ones(3, dtype=torch.bool))
    assert torch.equal(mask.bool(), rollout.completion_mask.bool() & ~observed)

    # Attended: changing an observation token changes the policy's log-probs of later tokens.
    with torch.no_grad():
        before, _ = module.completion_logps(rollout, grad=False)
        altered = Rollout(**{**rollout.__dict__, "completion_ids": rollout.completion_ids.clone()})
        row, first = next((r, int(observed[r].nonzero()[0])) for r in range(3) if observed[r].any())
        altered.completion_ids[row, first + 1] = (altered.completion_ids[row, first + 1] + 7) % 1000
        after, _ = module.completion_logps(altered, grad=False)
    later = mask[row].bool() & (torch.arange(mask.shape[1]) > first + 1)
    assert later.any() and not torch.allclose(before[row][later], after[row][later])

    # Outside the loss: log-probs, reference log-probs and entropies at observation positions
    # can be anything without changing the loss, its gradient, the KL or the entropy figures.
    advantages = torch.tensor([1.0, -0.5, -0.5])
    totals = StepTotals.of(mask, rows=3)

    def loss_with(garbage: float):
        def logps_fn(rows):
            logps, entropy = module.completion_logps(rollout, rows=rows, grad=True)
            noise = observed[rows].to(logps.dtype) * garbage
            return logps + noise, entropy + noise
        ref = before + observed * (3 * garbage)
        module.model.zero_grad(set_to_none=True)
        loss, stats = loss_pass(logps_fn, advantages, mask, module.loss_config, totals, None, ref_logps=ref)
        grads = [p.grad.clone() for n, p in module.model.named_parameters() if "lora_" in n and p.grad is not None]
        return loss, stats, grads

    loss_a, stats_a, grads_a = loss_with(0.0)
    loss_b, stats_b, grads_b = loss_with(5.0)
    assert math.isclose(loss_a, loss_b, rel_tol=1e-5, abs_tol=1e-7)
    assert stats_a["on_tokens"] == stats_b["on_tokens"] == float(mask.sum())
    for key in ("kl", "entropy"):
        assert math.isclose(stats_a[key], stats_b[key], rel_tol=1e-5, abs_tol=1e-7), key
    assert grads_a and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_a, grads_b))
