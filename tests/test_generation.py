"""The generation engine against HF generate and against a recomputed forward pass."""

import pytest
import torch

from brainforge.generation.engine import GenerationEngine, SamplingParams, sample


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


PROMPTS = [[5, 17, 300, 41], [9, 8], [100, 200, 300, 400, 500, 600]]


def hf_greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_greedy_matches_hf_generate_with_left_padding(model, tokenizer):
    engine = GenerationEngine(model, tokenizer, stop_token_ids=[])
    engine.stop_token_ids = torch.tensor([-1])  # never stop early: compare full length
    rollout = engine.generate(PROMPTS, num_samples=2, params=SamplingParams(max_new_tokens=6, temperature=0))
    assert rollout.completion_ids.shape == (6, 6)
    for row in range(6):
        assert rollout.completion_ids[row].tolist() == hf_greedy(model, PROMPTS[row // 2], 6), row
        assert rollout.prompt_ids[row] == PROMPTS[row // 2]
    assert rollout.truncated.all() and rollout.completion_mask.all()


def test_rows_stop_at_their_own_stop_token_and_keep_it(model, tokenizer):
    greedy = hf_greedy(model, PROMPTS[0], 6)
    stop = greedy[2]
    engine = GenerationEngine(model, tokenizer, stop_token_ids=[stop])
    rollout = engine.generate(PROMPTS, num_samples=1, params=SamplingParams(max_new_tokens=6, temperature=0))
    first = rollout.completion_ids[0][rollout.completion_mask[0].bool()].tolist()
    assert first == greedy[: greedy.index(stop) + 1] and not rollout.truncated[0]
    # The other rows went on after row 0 left the batch, and still match plain generate.
    for row in (1, 2):
        expected = hf_greedy(model, PROMPTS[row], 6)
        if stop in expected:
            expected = expected[: expected.index(stop) + 1]
        got = rollout.completion_ids[row][rollout.completion_mask[row].bool()].tolist()
        assert got == expected
    assert rollout.stats["decode_row_steps"] < 3 * 5  # finished rows were dropped


def test_sampling_logprobs_match_a_forward_pass_at_temperature(model, tokenizer):
    engine = GenerationEngine(model, tokenizer, stop_token_ids=[])
    params = SamplingParams(max_new_tokens=5, temperature=0.7, return_logprobs=True)
    rollout = engine.generate(PROMPTS[:2], num_samples=3, params=params, generator=torch.Generator().manual_seed(0))
    for row in range(6):
        prompt = rollout.prompt_ids[row]
        completion = rollout.completion_ids[row][rollout.completion_mask[row].bool()]
        ids = torch.tensor([prompt + completion.tolist()])
        logits = model(ids).logits[0, len(prompt) - 1 : -1] / 0.7
        expected = torch.log_softmax(logits, -1).gather(1, completion[:, None]).squeeze(1)
        assert torch.allclose(rollout.logprobs[row, : len(completion)], expected, atol=1e-4)


def test_samples_differ_within_a_group(model, tokenizer):
    engine = GenerationEngine(model, tokenizer, stop_token_ids=[])
    rollout = engine.generate([PROMPTS[0]], num_samples=4, params=SamplingParams(max_new_tokens=8, temperature=1.5),
                              generator=torch.Generator().manual_seed(1))
    assert len({tuple(r.tolist()) for r in rollout.completion_ids}) > 1


def test_stop_strings(model, tokenizer):
    engine = GenerationEngine(model, tokenizer, stop_token_ids=[])
    full = engine.generate([PROMPTS[0]], 1, SamplingParams(max_new_tokens=8, temperature=0)).texts[0]
    assert len(full) > 3
    stop = full[1:3]
    cut = engine.generate([PROMPTS[0]], 1, SamplingParams(max_new_tokens=8, temperature=0, stop_strings=(stop,)))
    assert stop in cut.texts[0] and len(cut.texts[0]) < len(full) and not cut.truncated[0]


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = {int(sample(logits, 1.0, 0.7, torch.Generator().manual_seed(i))[0]) for i in range(200)}
    assert seen == {0, 1}


def test_bad_params():
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
