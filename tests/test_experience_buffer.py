"""ExGRPO experience buffer (ALGORITHMS.md sections 4 and 7): buckets, retirement,
sampling, persistence. Pure Python + torch, no model."""

from __future__ import annotations

import datetime
import io
import math

import numpy as np
import pytest
import torch

from brainforge.config import ExperienceSettings
from brainforge.data.prompts import PromptExample
from brainforge.errors import BrainforgeError, ConfigError
from brainforge.rl.experience import Experience, ExperienceBuffer, question_uid, select_lowest_entropy

K = 8
SIGNATURE = {"model": "default", "reward": "exact_match", "dataset": "reasoning_gym:basic_arithmetic"}


def make_buffer(group_size: int = K, signature: dict | None = None, **settings) -> ExperienceBuffer:
    return ExperienceBuffer(ExperienceSettings(**settings), group_size, dict(SIGNATURE if signature is None else signature))


def exp(*token_ids: int, logprob: float = -0.5) -> Experience:
    return Experience(token_ids=list(token_ids), logprobs=[logprob] * len(token_ids), text=" ".join(map(str, token_ids)))


def record(buffer: ExperienceBuffer, uid: str, k: int, n_correct: int | None = None, base: int = 0) -> None:
    """Record question `uid` with k successes and min(k, n_correct) distinct correct trajectories."""
    n = k if n_correct is None else n_correct
    buffer.record_group(uid, PromptExample([{"role": "user", "content": uid}], {"answer": uid}), k, [exp(base + i, 99) for i in range(n)])


def bucket_members(buffer: ExperienceBuffer) -> dict[int, list[str]]:
    return {k: list(uids) for k, uids in buffer._buckets.items()}


# ---------------------------------------------------------------------- collection


def test_only_questions_with_lbound_below_k_up_to_rbound_enter():
    buffer = make_buffer(lbound=1, rbound=5)
    for uid, k in {"k0": 0, "k1": 1, "k2": 2, "k5": 5, "k6": 6, "k7": 7}.items():
        record(buffer, uid, k)
    assert sorted(buffer.eligible()) == ["k2", "k5"]
    assert buffer.bucket_of("k2") == 2 and buffer.bucket_of("k5") == 5
    assert buffer.bucket_of("k1") is None and buffer.bucket_of("k6") is None
    assert [e.token_ids for e in buffer.trajectories("k2")] == [[0, 99], [1, 99]]


def test_default_bounds_store_every_partial_success():
    buffer = make_buffer()  # lbound 0, rbound K - 1
    for k in range(K + 1):
        record(buffer, f"q{k}", k)
    assert sorted(buffer.eligible()) == [f"q{k}" for k in range(1, K)]
    assert buffer.is_retired(f"q{K}") and not buffer.is_retired("q0")


def test_more_correct_trajectories_than_successes_is_refused():
    # Only correct trajectories may be stored: k successes cannot bring k + 1 correct ones.
    buffer = make_buffer()
    with pytest.raises(ValueError, match="3 correct trajectories for 2 successes"):
        buffer.record_group("q", None, 2, [exp(1), exp(2), exp(3)])
    with pytest.raises(ValueError, match="successes must be in 0..8"):
        buffer.record_group("q", None, 9, [])


def test_partial_success_without_trajectories_is_not_stored():
    buffer = make_buffer()
    buffer.record_group("q", None, 3, [])
    assert buffer.eligible() == [] and buffer.stats()["experience/questions"] == 0


def test_full_solve_retires_from_buffer_and_every_bucket_for_good():
    buffer = make_buffer()
    record(buffer, "solved", 3)
    record(buffer, "other", 4)
    record(buffer, "solved", K)
    assert buffer.is_retired("solved")
    assert buffer.eligible() == ["other"]
    assert all("solved" not in uids for uids in bucket_members(buffer).values())
    assert buffer.stats()["experience/bucket_3"] == 0 and buffer.stats()["experience/retired"] == 1
    with pytest.raises(KeyError, match="retired"):
        buffer.trajectories("solved")
    # A later rollout with k < K does not bring it back...
    record(buffer, "solved", 2)
    assert buffer.eligible() == ["other"] and buffer.bucket_of("solved") is None
    # ...and it is never sampled.
    record(buffer, "third", 4)
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        assert "solved" not in buffer.sample_questions(2, generator)


def test_bucket_update_moves_uid_to_exactly_one_bucket():
    buffer = make_buffer()
    record(buffer, "q", 2)
    record(buffer, "q", 5, base=10)
    members = bucket_members(buffer)
    assert [k for k, uids in members.items() if "q" in uids] == [5]
    assert buffer.stats()["experience/bucket_2"] == 0 and buffer.stats()["experience/bucket_5"] == 1
    # A rollout outside the bounds (k = 0) stores nothing and leaves the bucket alone.
    record(buffer, "q", 0)
    assert [k for k, uids in bucket_members(buffer).items() if "q" in uids] == [5]
    assert len(buffer.trajectories("q")) == 7  # 2 from the first rollout + 5 new (distinct ids)


def test_trajectories_are_deduplicated_by_token_ids_newest_log_probs_win():
    buffer = make_buffer()
    buffer.record_group("q", None, 3, [exp(1, 2, logprob=-1.0), exp(1, 2, logprob=-2.0), exp(3)])
    buffer.record_group("q", None, 2, [exp(1, 2, logprob=-3.0), exp(4)])
    stored = buffer.trajectories("q")
    assert [e.token_ids for e in stored] == [[3], [1, 2], [4]]
    assert stored[1].logprobs == [-3.0, -3.0]


def test_at_most_max_trajectories_per_question_keeping_the_newest():
    buffer = make_buffer(max_trajectories_per_question=3)
    buffer.record_group("q", None, 4, [exp(1), exp(2), exp(3), exp(4)])
    buffer.record_group("q", None, 2, [exp(5), exp(6)])
    assert [e.token_ids for e in buffer.trajectories("q")] == [[4], [5], [6]]
    assert buffer.stats()["experience/size"] == 3


def test_experience_needs_one_log_prob_per_token():
    with pytest.raises(ValueError, match="2 token ids but 1 log-probs"):
        Experience([1, 2], [-0.1], "ab")


# ---------------------------------------------------------------------- activation and counts


def test_replay_activates_only_after_solve_rate_strictly_above_threshold_and_stays_on():
    buffer = make_buffer()
    record(buffer, "q", 3)
    buffer.observe_solve_rate(0.2)
    buffer.observe_solve_rate(0.35)
    assert not buffer.active and buffer.replay_count(8) == 0
    buffer.observe_solve_rate(0.36)
    assert buffer.active and buffer.replay_count(8) == 1
    buffer.observe_solve_rate(0.0)
    assert buffer.active and buffer.stats()["experience/active"] == 1.0


def test_replay_count_is_min_of_eligible_and_floor_rho_b():
    buffer = make_buffer(experience_ratio=0.5)
    buffer.observe_solve_rate(1.0)
    assert buffer.replay_count(8) == 0
    for i in range(3):
        record(buffer, f"q{i}", 2, base=10 * i)
    assert buffer.replay_count(8) == 3  # min(3, 4)
    assert buffer.replay_count(4) == 2  # min(3, 2)
    assert buffer.replay_count(5) == 2  # floor(2.5)
    many = make_buffer(experience_ratio=0.29)
    many.observe_solve_rate(1.0)
    for i in range(40):
        record(many, f"q{i}", 2)
    assert many.replay_count(100) == 29  # 0.29 * 100 is 28.999999999999996 in floating point


# ---------------------------------------------------------------------- bucket weights


def fill_buckets(buffer: ExperienceBuffer, per_bucket: dict[int, int]) -> dict[str, int]:
    """Put per_bucket[k] questions into bucket k; returns uid -> bucket."""
    where = {}
    for k, count in per_bucket.items():
        for i in range(count):
            uid = f"b{k}_{i}"
            record(buffer, uid, k)
            where[uid] = k
    return where


def test_normal_weighting_peaks_at_half_k_and_sums_to_one():
    buffer = make_buffer()
    fill_buckets(buffer, {k: 1 for k in range(1, K)})
    probs = buffer.bucket_probabilities()
    assert sorted(probs) == list(range(1, K))
    assert max(probs, key=probs.get) == K // 2
    assert math.isclose(sum(probs.values()), 1.0, rel_tol=1e-12)
    # Gaussian with sigma 1: one step from the mean costs a factor exp(-1/2).
    assert math.isclose(probs[3] / probs[4], math.exp(-0.5), rel_tol=1e-9)
    assert math.isclose(probs[2] / probs[6], 1.0, rel_tol=1e-9)


def test_probabilities_cover_only_non_empty_buckets():
    buffer = make_buffer()
    fill_buckets(buffer, {1: 5, 6: 1})
    probs = buffer.bucket_probabilities()
    assert sorted(probs) == [1, 6]
    assert math.isclose(sum(probs.values()), 1.0, rel_tol=1e-12)
    assert probs[6] > probs[1]
    assert make_buffer().bucket_probabilities() == {}


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("linear", {2: 2 / 6, 4: 4 / 6}), ("sqrt", {2: math.sqrt(2) / (math.sqrt(2) + 2), 4: 2 / (math.sqrt(2) + 2)}), ("uniform", {2: 0.5, 4: 0.5})],
)
def test_other_weightings(mode, expected):
    buffer = make_buffer(bucket_weighting=mode)
    fill_buckets(buffer, {2: 3, 4: 1})
    probs = buffer.bucket_probabilities()
    assert probs.keys() == expected.keys()
    for k, p in expected.items():
        assert math.isclose(probs[k], p, rel_tol=1e-9)


def test_far_buckets_of_a_large_group_do_not_underflow_to_an_impossible_draw():
    # K = 128: the Gaussian density at k = 1 and 2 (mu = 64) is exp(-1984) = 0.0 in float64.
    buffer = make_buffer(group_size=128)
    fill_buckets(buffer, {1: 2, 2: 2})
    probs = buffer.bucket_probabilities()
    assert all(math.isfinite(p) for p in probs.values())
    assert math.isclose(sum(probs.values()), 1.0) and probs[2] > 0.99
    assert len(set(buffer.sample_questions(3, torch.Generator().manual_seed(0)))) == 3


# ---------------------------------------------------------------------- sampling


def test_sampling_returns_distinct_eligible_uids_deterministically():
    buffer = make_buffer()
    fill_buckets(buffer, {1: 3, 3: 4, 4: 5, 7: 2})
    record(buffer, "never0", 0)
    record(buffer, "solved", 4)
    record(buffer, "solved", K)
    eligible = set(buffer.eligible())
    assert "never0" not in eligible and "solved" not in eligible
    for seed in range(20):
        first = buffer.sample_questions(6, torch.Generator().manual_seed(seed))
        assert len(first) == len(set(first)) == 6 and set(first) <= eligible
        assert buffer.sample_questions(6, torch.Generator().manual_seed(seed)) == first
    everything = buffer.sample_questions(len(eligible), torch.Generator().manual_seed(1))
    assert sorted(everything) == sorted(eligible)
    with pytest.raises(ValueError, match="cannot sample 15 questions from 14"):
        buffer.sample_questions(15, torch.Generator().manual_seed(0))
    assert buffer.sample_questions(0, torch.Generator()) == []


def test_overflow_of_a_small_bucket_goes_to_the_other_buckets():
    # Bucket 4 takes ~99.98% of the weight but holds one question: nearly every draw of 5
    # asks it for 5, and the 4 it cannot give must come from buckets 1 and 7.
    buffer = make_buffer()
    where = fill_buckets(buffer, {1: 10, 4: 1, 7: 10})
    for seed in range(10):
        sample = buffer.sample_questions(5, torch.Generator().manual_seed(seed))
        assert len(set(sample)) == 5
        assert "b4_0" in sample
        assert sum(where[uid] != 4 for uid in sample) == 4


def test_empirical_bucket_frequencies_track_the_probabilities():
    # Unequal bucket sizes: the weight is per bucket, not per question in it.
    buffer = make_buffer()
    where = fill_buckets(buffer, {1: 40, 2: 30, 3: 3, 4: 20, 5: 3, 6: 30, 7: 40})
    density = {k: math.exp(-((k - K / 2) ** 2) / 2) / math.sqrt(2 * math.pi) for k in range(1, K)}
    probs = {k: d / sum(density.values()) for k, d in density.items()}
    assert buffer.bucket_probabilities() == pytest.approx(probs, rel=1e-9)
    generator = torch.Generator().manual_seed(1234)
    draws = 4000
    counts = {k: 0 for k in probs}
    for _ in range(draws):
        (uid,) = buffer.sample_questions(1, generator)
        counts[where[uid]] += 1
    chi_square = sum((counts[k] - draws * p) ** 2 / (draws * p) for k, p in probs.items())
    assert chi_square < 22.46, (chi_square, counts)  # 6 degrees of freedom, p = 0.001


def test_within_a_bucket_questions_are_drawn_without_replacement_and_evenly():
    buffer = make_buffer()
    fill_buckets(buffer, {4: 4})
    generator = torch.Generator().manual_seed(7)
    seen = {f"b4_{i}": 0 for i in range(4)}
    for _ in range(400):
        for uid in buffer.sample_questions(2, generator):
            seen[uid] += 1
    assert all(150 < count < 250 for count in seen.values()), seen  # 200 expected each


# ---------------------------------------------------------------------- persistence


def populated_buffer() -> ExperienceBuffer:
    buffer = make_buffer(max_trajectories_per_question=4)
    columns = {"answer": "42", "n": np.int64(7), "arr": np.arange(3), "when": datetime.date(2024, 1, 2), "nested": {"t": (1, 2)}}
    for i, k in enumerate([1, 3, 4, 4, 6]):
        prompt = PromptExample([{"role": "system", "content": "s"}, {"role": "user", "content": f"q{i}"}], dict(columns))
        buffer.record_group(f"u{i}", prompt, k, [Experience([i, j, 2], [-0.1 * j, -1.25, -3.0e-7], f"t{i}{j}") for j in range(k)])
    record(buffer, "u3", 2, base=50)  # a bucket move: u3 now comes after u4 in bucket order
    record(buffer, "gone", 2)
    record(buffer, "gone", K)
    buffer.observe_solve_rate(0.5)
    return buffer


def round_trip(state: dict) -> dict:
    blob = io.BytesIO()
    torch.save({"brainforge": {"experience": state}}, blob)
    blob.seek(0)
    # Lightning's trainer.fit(ckpt_path=...) calls torch.load with weights_only=None, which
    # is True on torch >= 2.6: only plain types may be in the checkpoint.
    return torch.load(blob, weights_only=True)["brainforge"]["experience"]


def test_state_round_trip_through_weights_only_torch_load():
    original = populated_buffer()
    restored = make_buffer(max_trajectories_per_question=4)
    restored.load_state_dict(round_trip(original.state_dict()))
    assert restored.active
    assert restored.eligible() == original.eligible()
    assert bucket_members(restored) == bucket_members(original)
    assert restored.is_retired("gone") and restored.stats() == original.stats()
    for uid in original.eligible():
        assert restored.trajectories(uid) == original.trajectories(uid)
    prompt = restored.prompt("u0")
    assert isinstance(prompt, PromptExample)
    assert prompt.messages == original.prompt("u0").messages
    assert prompt.columns["answer"] == "42" and prompt.columns["n"] == 7 and prompt.columns["arr"] == [0, 1, 2]
    assert prompt.columns["nested"] == {"t": (1, 2)}
    assert prompt.columns["when"] == "2024-01-02"  # not checkpointable as a date: kept as text
    for seed in range(5):
        assert restored.sample_questions(3, torch.Generator().manual_seed(seed)) == original.sample_questions(3, torch.Generator().manual_seed(seed))


def test_prompt_factory_rebuilds_prompts():
    restored = make_buffer(max_trajectories_per_question=4)
    restored.load_state_dict(round_trip(populated_buffer().state_dict()), prompt_factory=lambda plain: ("rebuilt", plain["messages"][-1]["content"]))
    assert restored.prompt("u2") == ("rebuilt", "q2")


def test_incompatible_signature_names_each_difference_and_leaves_buffer_alone():
    state = round_trip(populated_buffer().state_dict())
    changed = dict(SIGNATURE, model="other-model", reward="contains")
    target = make_buffer(signature=changed)
    record(target, "mine", 3)
    with pytest.raises(ConfigError) as caught:
        target.load_state_dict(state)
    message = str(caught.value)
    assert "model: 'default' -> 'other-model'" in message and "reward: 'exact_match' -> 'contains'" in message
    assert "dataset" not in message
    assert "start a new run" in message and "restore" in message
    assert target.eligible() == ["mine"] and not target.active


def test_different_group_size_or_bounds_is_incompatible_even_with_equal_signature():
    state = round_trip(populated_buffer().state_dict())
    with pytest.raises(ConfigError, match=r"algorithm.grpo.num_generations: 8 -> 4"):
        make_buffer(group_size=4).load_state_dict(state)
    with pytest.raises(ConfigError, match=r"algorithm.experience.rbound: 7 -> 6"):
        make_buffer(rbound=6).load_state_dict(state)


def test_damaged_state_is_rejected_naming_the_question():
    state = round_trip(populated_buffer().state_dict())
    state["entries"][1]["trajectories"][0]["logprobs"].pop()
    target = make_buffer()
    with pytest.raises(BrainforgeError, match=r"damaged \(question u1: Experience has 3 token ids but 2 log-probs\)"):
        target.load_state_dict(state)
    assert target.eligible() == []
    state = round_trip(populated_buffer().state_dict())
    state["buckets"][3].append("u0")  # u0 is already in bucket 1
    with pytest.raises(BrainforgeError, match="bucket 3 lists question u0, which is unknown or already in a bucket"):
        make_buffer().load_state_dict(state)
    with pytest.raises(BrainforgeError, match="format version"):
        make_buffer().load_state_dict({"version": 99})


def test_lowered_max_trajectories_trims_on_load():
    restored = make_buffer(max_trajectories_per_question=2)
    original = populated_buffer()
    restored.load_state_dict(round_trip(original.state_dict()))
    assert restored.trajectories("u4") == original.trajectories("u4")[-2:]


# ---------------------------------------------------------------------- settings


def test_bounds_that_cannot_work_are_config_errors():
    with pytest.raises(ConfigError, match="algorithm.experience.rbound: 8 must be below num_generations"):
        make_buffer(rbound=8)
    with pytest.raises(ConfigError, match="algorithm.experience.lbound: 7 leaves no bucket"):
        make_buffer(lbound=7)


# ---------------------------------------------------------------------- helpers


def test_select_lowest_entropy_is_argmin_first_on_ties():
    trajectories = [exp(1), exp(2), exp(3), exp(4)]
    assert select_lowest_entropy(trajectories, [0.5, 0.2, 0.2, 0.9]) == 1
    assert select_lowest_entropy(trajectories, [float("nan"), 0.3, 0.1, float("nan")]) == 2
    assert select_lowest_entropy(trajectories[:1], [float("nan")]) == 0
    with pytest.raises(ValueError):
        select_lowest_entropy(trajectories, [0.1])


def test_question_uid_is_stable_and_order_independent():
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    uid = question_uid(messages)
    assert len(uid) == 16 and all(c in "0123456789abcdef" for c in uid)
    assert uid == question_uid([{"content": "What is 2 + 3?", "role": "user"}])
    assert uid != question_uid([{"role": "user", "content": "What is 2 + 4?"}])
    # Pinned: a changed recipe would orphan every buffer saved by an earlier version on --resume.
    assert uid == "c201b8ac3780ef25"
