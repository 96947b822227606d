"""Packing and collators: bin packing invariants, and a tiny Qwen2 model giving each packed example
exactly the logits (and loss) it gets alone, for the sdpa and eager attention kernels."""

import random

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

from align.packing import IGNORE_INDEX, collate_packed, collate_padded, pack_examples

PAD = 0


def make_examples(lengths, seed=0, vocab=1000):
    """Examples with random ids; labels mask a random-length prompt, as ChatML examples do."""
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(1, vocab) for _ in range(n)]
        prompt = rng.randrange(0, n)
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


@pytest.fixture(scope="module")
def tiny_qwen2():
    # A larger init range than the default 0.02 makes attention depend strongly on context, so a mask
    # that leaked across examples would move the logits far beyond the tolerance (checked below).
    config = Qwen2Config(
        vocab_size=1000,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).float().eval()


# ------------------------------------------------------------------------------------------------
# pack_examples


def test_pack_examples_places_every_example_once_within_budget():
    lengths = [5, 17, 3, 30, 8, 8, 1, 12, 29, 2, 16, 16]
    examples = make_examples(lengths)
    rows = pack_examples(examples, 32)
    seen = sorted(i for r in rows for i in r["example_indices"])
    assert seen == list(range(len(examples)))
    assert sum(lengths) <= 32 * len(rows)
    # best-fit decreasing packs these 147 tokens into the minimum of ceil(147 / 32) = 5 rows
    assert len(rows) == 5
    for r in rows:
        assert len(r["input_ids"]) == len(r["labels"]) == len(r["position_ids"]) == sum(r["seq_lens"]) <= 32
        assert r["example_indices"] == sorted(r["example_indices"])
        start = 0
        for i, n in zip(r["example_indices"], r["seq_lens"], strict=True):
            ex = examples[i]
            assert n == len(ex["input_ids"])
            assert r["input_ids"][start : start + n] == ex["input_ids"]
            assert r["position_ids"][start : start + n] == list(range(n))
            # the first label is never a target of its own example; masked so the previous one can't learn it
            assert r["labels"][start : start + n] == [IGNORE_INDEX] + ex["labels"][1:]
            start += n
    firsts = [r["example_indices"][0] for r in rows]
    assert firsts == sorted(firsts)


def test_pack_examples_exact_layout():
    examples = make_examples([4, 3, 2, 1])
    rows = pack_examples(examples, 5)
    assert [r["example_indices"] for r in rows] == [[0, 3], [1, 2]]
    assert rows[0]["position_ids"] == [0, 1, 2, 3, 0]
    assert rows[1]["seq_lens"] == [3, 2]


def test_pack_examples_is_deterministic_and_shuffle_seed_only_reorders_rows():
    examples = make_examples([random.Random(1).randrange(1, 60) for _ in range(200)])
    a, b = pack_examples(examples, 64), pack_examples(examples, 64)
    assert a == b
    s1, s2 = pack_examples(examples, 64, shuffle_seed=3), pack_examples(examples, 64, shuffle_seed=3)
    assert s1 == s2
    assert s1 != a
    key = lambda rows: sorted(r["example_indices"] for r in rows)  # noqa: E731
    assert key(s1) == key(a)


def test_pack_examples_rejects_too_long_empty_and_mismatched():
    with pytest.raises(ValueError, match="example 1 has 9 tokens, more than max_length 8"):
        pack_examples(make_examples([3, 9]), 8)
    with pytest.raises(ValueError, match="example 0 is empty"):
        pack_examples([{"input_ids": [], "labels": []}], 8)
    with pytest.raises(ValueError, match="3 labels for 2 input ids"):
        pack_examples([{"input_ids": [1, 2], "labels": [1, 2, 3]}], 8)
    assert pack_examples([], 8) == []


# ------------------------------------------------------------------------------------------------
# collators


def test_collate_padded():
    batch = collate_padded(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}],
        pad_token_id=PAD,
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, PAD, PAD]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collate_packed_pads_as_own_segment_without_attention_mask():
    rows = pack_examples(make_examples([3, 2, 4]), 5)  # rows: [ex0 (3) + ex1 (2)], [ex2 (4)]
    batch = collate_packed(rows, pad_token_id=PAD)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["input_ids"][1, 4].item() == PAD
    assert batch["labels"][1, 4].item() == IGNORE_INDEX


# ------------------------------------------------------------------------------------------------
# a real model: packed == alone


def batch_inputs(batch):
    # use_cache=False matters: with a cache (the config default, even in training mode) transformers
    # skips the packed-sequence detection and silently applies one causal mask over the whole row.
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}


def _packed_batch():
    # 9 examples into rows of 48: several examples per row, and rows of different lengths (padding).
    examples = make_examples([20, 7, 13, 30, 5, 11, 26, 9, 3], seed=2)
    rows = pack_examples(examples, 48)
    batch = collate_packed(rows, pad_token_id=PAD)
    assert any(len(r["seq_lens"]) >= 3 for r in rows)
    assert any(len(r["input_ids"]) < batch["input_ids"].shape[1] for r in rows)
    return examples, rows, batch


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_logits_alone(tiny_qwen2, attn):
    model = tiny_qwen2
    model.set_attn_implementation(attn)
    examples, rows, batch = _packed_batch()
    with torch.no_grad():
        packed = model(**batch_inputs(batch)).logits
        leaky = model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            attention_mask=torch.ones_like(batch["input_ids"]),
            use_cache=False,
        ).logits
        worst_leak = 0.0
        for b, r in enumerate(rows):
            start = 0
            for i, n in zip(r["example_indices"], r["seq_lens"], strict=True):
                alone = model(input_ids=torch.tensor([examples[i]["input_ids"]])).logits[0]
                torch.testing.assert_close(packed[b, start : start + n], alone, atol=1e-4, rtol=0)
                worst_leak = max(worst_leak, (leaky[b, start : start + n] - alone).abs().max().item())
                start += n
    # Control: attending across examples (a plain causal mask) would have failed the check above.
    assert worst_leak > 1e-2


def test_packed_loss_equals_sum_of_per_example_losses(tiny_qwen2):
    model = tiny_qwen2
    model.set_attn_implementation("sdpa")
    examples, _, batch = _packed_batch()

    def summed_loss(logits, labels):
        return F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            labels[:, 1:].reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )

    with torch.no_grad():
        logits = model(**batch_inputs(batch)).logits
        packed_loss = summed_loss(logits, batch["labels"])
        alone_loss = sum(
            summed_loss(model(input_ids=torch.tensor([ex["input_ids"]])).logits, torch.tensor([ex["labels"]]))
            for ex in examples
        )
        n_targets = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().item()
    assert n_targets == sum(sum(t != IGNORE_INDEX for t in ex["labels"][1:]) for ex in examples)
    torch.testing.assert_close(packed_loss, alone_loss, rtol=1e-5, atol=1e-3)
