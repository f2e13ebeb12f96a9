"""SFT loss properties (ALGORITHMS.md section 7) on a tiny random model."""

import pytest
import torch

from brainforge.data.collate import MicroBatchCollator, pack_examples, packed_collate, pad_collate
from brainforge.data.templates import IGNORE_INDEX, TokenizedExample
from brainforge.training.losses import sum_token_nll


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def make_examples(n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        length = 6 + 3 * i
        ids = torch.randint(10, 1000, (length,), generator=gen).tolist()
        prompt = length // 2
        examples.append(TokenizedExample(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return examples


def mean_loss(model, batches):
    total, count = 0.0, 0
    for batch in batches:
        nll, n = sum_token_nll(model, batch)
        total, count = total + nll, count + n
    return total / count


def test_loss_is_mean_nll_over_labelled_tokens_only(model):
    example = make_examples(1)[0]
    batch = pad_collate([example], pad_id=0)
    logits = model(batch["input_ids"]).logits[0, :-1].float()
    targets = torch.tensor(example.labels[1:])
    keep = targets != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    nll, n = sum_token_nll(model, batch)
    assert n == keep.sum()
    assert torch.allclose(nll / n, expected, atol=1e-5)


def test_padding_invariance(model):
    examples = make_examples(3)
    alone = [pad_collate([e], pad_id=0) for e in examples]
    padded = pad_collate(examples, pad_id=0)
    assert torch.allclose(mean_loss(model, alone), mean_loss(model, [padded]), atol=1e-5)


def test_packed_equals_unpacked(model):
    examples = make_examples(5)
    rows = pack_examples(examples, max_length=40, seed=0)
    assert len(rows) < len(examples)  # something was really packed
    packed = packed_collate(rows, pad_id=0)
    unpacked = pad_collate(examples, pad_id=0)
    assert torch.allclose(mean_loss(model, [packed]), mean_loss(model, [unpacked]), atol=1e-5)


def test_packed_mask_is_block_diagonal():
    rows = [[TokenizedExample([1, 2, 3], [IGNORE_INDEX, 2, 3]), TokenizedExample([4, 5], [IGNORE_INDEX, 5])]]
    batch = packed_collate(rows, pad_id=0)
    mask = batch["attention_mask"][0, 0]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1]
    assert not mask[3, :3].any() and mask[4, 3] and mask[2, 0] and not mask[0, 1]


def test_accumulation_equals_whole_batch(model):
    """Token-weighted normalisation: micro-batch split does not change the loss."""
    examples = make_examples(4)
    micro = MicroBatchCollator(micro_batch_size=1, pad_id=0, packed=False)(examples)
    whole = MicroBatchCollator(micro_batch_size=4, pad_id=0, packed=False)(examples)
    assert len(micro) == 4 and len(whole) == 1
    assert torch.allclose(mean_loss(model, micro), mean_loss(model, whole), atol=1e-5)
    # ... whereas averaging per-micro-batch means would differ (lengths differ).
    per_batch = torch.stack([sum_token_nll(model, b)[0] / sum_token_nll(model, b)[1] for b in micro]).mean()
    assert not torch.allclose(per_batch, mean_loss(model, whole), atol=1e-4)


def test_padding_free_micro_batches_equal_padded(model):
    examples = make_examples(4)
    padded = MicroBatchCollator(micro_batch_size=2, pad_id=0, packed=False, padding_free=False)(examples)
    free = MicroBatchCollator(micro_batch_size=2, pad_id=0, packed=False, padding_free=True)(examples)
    assert [b["input_ids"].shape[0] for b in free] == [1, 1]  # one row per micro-batch, no padding
    assert sum(int(b["input_ids"].numel()) for b in free) == sum(len(e.input_ids) for e in examples)
    assert torch.allclose(mean_loss(model, padded), mean_loss(model, free), atol=1e-5)


def test_segment_attention_equals_dense_mask(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from brainforge.models.attention import enable_segment_attention

    dense_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    segment_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    assert enable_segment_attention(segment_model)
    rows = pack_examples(make_examples(5), max_length=40, seed=0)
    batch = packed_collate(rows, pad_id=0)
    assert any(len(lens) > len(row) for lens, row in zip(batch["segment_lengths"], rows))  # a padded tail exists
    dense_loss = mean_loss(dense_model, [batch])
    segment_loss = mean_loss(segment_model, [batch])
    assert torch.allclose(dense_loss, segment_loss, atol=1e-5)
    # Generation (no segment lengths) still works through the standard path.
    assert segment_model.generate(batch["input_ids"][:1, :4], max_new_tokens=2, do_sample=False).shape[1] == 6
