"""The reward model: end-token pooling, the pairwise loss on worked numbers, accuracy counting, packed vs
padded scoring, per-token values, and save/reload."""

import json
import math

import pytest
import torch

from align.data import end_token_id
from align.evaluation.reward_model import pairwise_accuracy, summarize, write_report
from align.losses import pairwise_reward_loss
from align.reward import (
    REWARD_CONFIG,
    REWARD_HEAD,
    RewardModel,
    end_token_index,
    pack_pairs,
    packed_end_index,
    pad_sequences,
)

END = 2  # SmolLM2's <|im_end|>, which is also its pad and eos token
PAD = 0

# --------------------------------------------------------------------------------------------------
# end_token_index on hand-built tensors


def test_end_index_right_padding():
    ids = torch.tensor(
        [
            [5, 6, 7, END, PAD, PAD],  # ends at 3
            [5, 6, 7, 8, 9, END],  # full row, ends at 5
            [5, END, 7, 8, PAD, PAD],  # an earlier end token, then more text: truncated (no end at 3)
        ]
    )
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    index, found = end_token_index(ids, mask, END)
    assert index.tolist() == [3, 5, 3]  # the unfound row points at its last real token, for a safe gather
    assert found.tolist() == [True, True, False]


def test_end_index_left_padding():
    ids = torch.tensor([[PAD, PAD, 5, 6, 7, END], [PAD, 5, 6, END, 8, 9], [5, 6, 7, 8, 9, END]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    index, found = end_token_index(ids, mask, END)
    assert index.tolist() == [5, 5, 5]
    assert found.tolist() == [True, False, True]


def test_end_index_pad_equals_eos():
    # SmolLM2: the pad id is the end token's id. "Last non-pad id" would pick position 2 (or 1); the
    # attention mask says where the real tokens end.
    ids = torch.tensor(
        [
            [1, 5, 6, END, END, END],  # right padded with pad == end
            [END, END, 1, 5, 6, END],  # left padded with pad == end
            [1, 5, 6, 7, END, END],  # right padded, the response never closed
            [END, END, END, END, END, END],  # all padding
        ]
    )
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]])
    index, found = end_token_index(ids, mask, END)
    assert index.tolist() == [3, 5, 3, 0]
    assert found.tolist() == [True, True, False, False]


def test_end_index_trailing_tokens_and_no_mask():
    nl = 198
    ids = torch.tensor([[5, 6, END, nl], [5, 6, 7, nl]])
    assert end_token_index(ids, None, END)[1].tolist() == [False, False]
    index, found = end_token_index(ids, None, END, max_trailing=1)
    assert index.tolist() == [2, 3] and found.tolist() == [True, False]


def test_packed_end_index():
    row = torch.tensor([[5, END, 6, 7, END, 8, 9]])
    index, found = packed_end_index(row, [2, 3, 2], END)
    assert index.tolist() == [1, 4, 6] and found.tolist() == [True, True, False]
    with pytest.raises(ValueError):
        packed_end_index(row, [2, 3], END)


# --------------------------------------------------------------------------------------------------
# the pairwise loss


def test_pairwise_loss_worked_example():
    # d = r_c - r_r = [1, 0, -2].
    # -log s(1)  = log(1 + e^-1) = 0.3132617
    # -log s(0)  = log 2         = 0.6931472
    # -log s(-2) = log(1 + e^2)  = 2.1269280
    # mean = 3.1333369 / 3 = 1.0444456
    chosen = torch.tensor([2.0, 0.5, -1.0], requires_grad=True)
    rejected = torch.tensor([1.0, 0.5, 1.0])
    loss, stats = pairwise_reward_loss(chosen, rejected)
    assert loss.item() == pytest.approx(1.0444456, abs=1e-6)
    assert stats["loss_sum"].item() == pytest.approx(3.1333369, abs=1e-6)
    assert stats["correct"].item() == 1 and stats["ties"].item() == 1
    assert stats["accuracy"].item() == pytest.approx(1 / 3)
    assert stats["margin"].item() == pytest.approx(-1 / 3)
    loss.backward()
    # d/dr_c of -log s(d) / 3 = -(1 - s(d)) / 3 = -s(-d) / 3: [-0.0896, -0.1667, -0.2936]
    expected = [-1 / (1 + math.exp(d)) / 3 for d in (1.0, 0.0, -2.0)]
    assert chosen.grad.tolist() == pytest.approx(expected, abs=1e-6)


def test_pairwise_loss_margin():
    # With margin m the pair must win by m: -log s(d - m).
    # d = [1, 1], m = [1, -1]: -log s(0) = 0.6931472, -log s(2) = log(1 + e^-2) = 0.1269280
    chosen, rejected = torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0])
    loss, _ = pairwise_reward_loss(chosen, rejected, margin=torch.tensor([1.0, -1.0]))
    assert loss.item() == pytest.approx((0.6931472 + 0.1269280) / 2, abs=1e-6)
    scalar, _ = pairwise_reward_loss(chosen, rejected, margin=1.0)
    assert scalar.item() == pytest.approx(0.6931472, abs=1e-6)
    # Margin 0 is no margin; accuracy and stats ignore the margin.
    zero, stats = pairwise_reward_loss(chosen, rejected, margin=torch.zeros(2))
    plain, _ = pairwise_reward_loss(chosen, rejected)
    assert zero.item() == pytest.approx(plain.item()) and stats["accuracy"].item() == 1.0


def test_pairwise_loss_reward_centring():
    # r_c + r_r = [3, -1]: (9 + 1) / 2 = 5 per pair on average; coef 0.1 adds 0.5.
    chosen, rejected = torch.tensor([2.0, 0.0], requires_grad=True), torch.tensor([1.0, -1.0])
    base, _ = pairwise_reward_loss(chosen, rejected)
    centred, stats = pairwise_reward_loss(chosen, rejected, center_coef=0.1)
    assert centred.item() == pytest.approx(base.item() + 0.5, abs=1e-6)
    assert stats["center_sum"].item() == pytest.approx(10.0)
    centred.backward()
    # The centring term's gradient is 0.1 * 2 (r_c + r_r) / 2 = [0.3, -0.1] on top of the pairwise part.
    pairwise = [-1 / (1 + math.exp(d)) / 2 for d in (1.0, 1.0)]
    assert chosen.grad.tolist() == pytest.approx([pairwise[0] + 0.3, pairwise[1] - 0.1], abs=1e-6)
    with pytest.raises(ValueError):
        pairwise_reward_loss(chosen, rejected, center_coef=-1.0)


def test_pairwise_loss_normalizer_makes_micro_batches_add_up():
    chosen, rejected = torch.randn(8), torch.randn(8)
    full, _ = pairwise_reward_loss(chosen, rejected, center_coef=0.05)
    parts = sum(
        pairwise_reward_loss(chosen[i : i + 2], rejected[i : i + 2], center_coef=0.05, normalizer=8)[0]
        for i in range(0, 8, 2)
    )
    assert parts.item() == pytest.approx(full.item(), abs=1e-6)


# --------------------------------------------------------------------------------------------------
# accuracy counting


def test_accuracy_counts_ties_as_not_correct():
    result = pairwise_accuracy([1.0, 2.0, 0.5, -10.0, 3.0], [0.0, 2.0, 0.7, -10.0, 1.0])
    assert result == {"pairs": 5, "correct": 2, "ties": 2, "wrong": 1, "accuracy": 0.4, "tie_rate": 0.4}


def test_summary_length_bias_and_margins(tmp_path):
    examples = [
        {"chosen_ids": [1] * 5, "rejected_ids": [1] * 3, "chosen_len": 4, "rejected_len": 2},  # longer
        {"chosen_ids": [1] * 5, "rejected_ids": [1] * 3, "chosen_len": 4, "rejected_len": 2},  # longer
        {"chosen_ids": [1] * 3, "rejected_ids": [1] * 5, "chosen_len": 2, "rejected_len": 4},  # shorter
        {"chosen_ids": [1] * 3, "rejected_ids": [1] * 3, "chosen_len": 2, "rejected_len": 2},  # same
    ]
    scores = {
        "chosen": [1.0, 0.0, 0.0, -10.0],
        "rejected": [0.0, 1.0, 2.0, -10.0],
        "chosen_found": [True, True, True, False],
        "rejected_found": [True, True, True, False],
    }
    result = summarize(examples, scores)
    assert result["accuracy"] == 0.25 and result["ties"] == 1 and result["unclosed"] == 1
    assert result["margins"] == [1.0, -1.0, -2.0, 0.0]
    assert result["mean_margin"] == -0.5 and result["median_margin"] == -0.5
    assert result["length_bias"] == {
        "chosen_longer": {"pairs": 2, "accuracy": 0.5},
        "chosen_shorter": {"pairs": 1, "accuracy": 0.0},
        "same_length": {"pairs": 1, "accuracy": 0.0},
    }
    paths = write_report({"toy": result}, tmp_path / "report", model="m")
    report = json.loads(paths["json"].read_text())
    assert report["accuracy"] == {"toy": 0.25} and report["datasets"]["toy"]["accuracy"] == 0.25
    assert "when the chosen response is longer (2 pairs)" in paths["md"].read_text()
    assert paths["png"].stat().st_size > 1000


# --------------------------------------------------------------------------------------------------
# the model on a tiny Qwen2


@pytest.fixture(scope="module")
def tiny_rm(tiny_qwen_dir, qwen_tokenizer):
    model = RewardModel.from_backbone(
        tiny_qwen_dir, end_token_id=end_token_id(qwen_tokenizer, "<|im_end|>"), seed=0, unclosed_reward=-7.0
    )
    return model.eval()


def _seqs(qwen_tokenizer):
    im_end = qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")
    return [[11, 12, 13, 14, im_end], [21, 22, im_end], [31, 32, 33, 34, 35, 36, 37, im_end], [41, im_end]]


def test_packed_left_and_right_padded_scores_agree(tiny_rm, qwen_tokenizer):
    seqs = _seqs(qwen_tokenizer)
    pad = qwen_tokenizer.pad_token_id
    with torch.no_grad():
        alone = torch.cat([tiny_rm(input_ids=torch.tensor([s])).rewards for s in seqs])
        for side in ("right", "left"):
            ids, mask = pad_sequences(seqs, pad, side=side)
            out = tiny_rm(input_ids=ids, attention_mask=mask)
            assert out.found.all()
            torch.testing.assert_close(out.rewards, alone, atol=1e-5, rtol=1e-5)
        examples = [
            {"chosen_ids": seqs[0], "rejected_ids": seqs[1], "margin": None},
            {"chosen_ids": seqs[2], "rejected_ids": seqs[3], "margin": 1.5},
        ]
        batch = pack_pairs(examples)
        assert batch["margin"].tolist() == [0.0, 1.5] and batch["has_margin"].tolist() == [False, True]
        packed = tiny_rm(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], end_index=batch["end_index"]
        )
        torch.testing.assert_close(packed.rewards, alone, atol=1e-5, rtol=1e-5)


def test_pad_equal_to_end_token_scores_the_same(tiny_rm, qwen_tokenizer):
    seqs = _seqs(qwen_tokenizer)
    im_end = qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        ids, mask = pad_sequences(seqs, qwen_tokenizer.pad_token_id, side="right")
        ids_eos, _ = pad_sequences(seqs, im_end, side="right")  # SmolLM2-style padding
        a = tiny_rm(input_ids=ids, attention_mask=mask)
        b = tiny_rm(input_ids=ids_eos, attention_mask=mask)
    torch.testing.assert_close(a.rewards, b.rewards, atol=1e-5, rtol=1e-5)
    assert a.index.tolist() == b.index.tolist() == [len(s) - 1 for s in seqs]


def test_unclosed_response_gets_the_penalty_not_a_score(tiny_rm):
    with torch.no_grad():
        out = tiny_rm(
            input_ids=torch.tensor([[11, 12, 13]]), attention_mask=torch.ones(1, 3, dtype=torch.long)
        )
    assert out.found.tolist() == [False] and out.rewards.tolist() == [-7.0]


def test_per_token_values_share_the_head(tiny_rm, qwen_tokenizer):
    seqs = _seqs(qwen_tokenizer)
    ids, mask = pad_sequences(seqs, qwen_tokenizer.pad_token_id, side="left")
    with torch.no_grad():
        out = tiny_rm(input_ids=ids, attention_mask=mask, return_all=True)
    assert out.values.shape == ids.shape
    torch.testing.assert_close(out.values[torch.arange(len(seqs)), out.index], out.rewards)


def test_save_and_reload_gives_identical_scores(tiny_rm, qwen_tokenizer, tmp_path):
    seqs = _seqs(qwen_tokenizer)
    ids, mask = pad_sequences(seqs, qwen_tokenizer.pad_token_id)
    with torch.no_grad():
        torch.nn.init.normal_(tiny_rm.head.bias)  # a non-zero bias must survive too
        before = tiny_rm(input_ids=ids, attention_mask=mask).rewards
    tiny_rm.save_pretrained(tmp_path / "rm", tokenizer=qwen_tokenizer)
    assert (tmp_path / "rm" / "model.safetensors").is_file() and (tmp_path / "rm" / REWARD_HEAD).is_file()
    config = json.loads((tmp_path / "rm" / REWARD_CONFIG).read_text())
    assert config["format"] == "align.reward_model" and config["end_token"] == "<|im_end|>"
    assert config["end_token_id"] == qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert config["unclosed_reward"] == -7.0 and config["hidden_size"] == 32
    reloaded = RewardModel.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        after = reloaded(input_ids=ids, attention_mask=mask).rewards
    assert torch.equal(before, after)


def test_a_causal_lm_directory_is_not_a_reward_model(tiny_qwen_dir):
    with pytest.raises(FileNotFoundError, match="not a reward model directory"):
        RewardModel.from_pretrained(tiny_qwen_dir)


# --------------------------------------------------------------------------------------------------
# an ensemble: K scalar heads on one backbone (issue 21)


def test_k_heads_score_k_members_and_reload_identically(tiny_qwen_dir, qwen_tokenizer, tmp_path):
    seqs = _seqs(qwen_tokenizer)
    ids, mask = pad_sequences(seqs, qwen_tokenizer.pad_token_id, side="left")
    end = end_token_id(qwen_tokenizer, "<|im_end|>")
    rm = RewardModel.from_backbone(tiny_qwen_dir, end_token_id=end, seed=0, num_heads=3).eval()
    with torch.no_grad():
        out = rm(input_ids=ids, attention_mask=mask, return_all=True)
        unclosed = rm(input_ids=torch.tensor([[11, 12, 13]]))
    assert out.member_rewards.shape == (4, 3) and out.rewards.shape == (4,)
    torch.testing.assert_close(out.rewards, out.member_rewards.mean(dim=1))
    # Each head is its own row of the (hidden -> 3) layer, read at the end token.
    torch.testing.assert_close(out.values[torch.arange(4), out.index], out.rewards)
    assert out.values.shape == ids.shape  # the value model reads one value per token: the heads' mean
    assert unclosed.member_rewards.tolist() == [[-10.0] * 3] and unclosed.rewards.tolist() == [-10.0]
    rm.save_pretrained(tmp_path / "k3", tokenizer=qwen_tokenizer)
    config = json.loads((tmp_path / "k3" / REWARD_CONFIG).read_text())
    assert (config["num_heads"], config["version"]) == (3, 2)
    reloaded = RewardModel.from_pretrained(tmp_path / "k3").eval()
    with torch.no_grad():
        again = reloaded(input_ids=ids, attention_mask=mask)
    assert torch.equal(again.member_rewards, out.member_rewards)


def test_one_head_keeps_format_version_1_and_an_old_config_loads(tiny_rm, qwen_tokenizer, tmp_path):
    seqs = _seqs(qwen_tokenizer)
    ids, mask = pad_sequences(seqs, qwen_tokenizer.pad_token_id)
    with torch.no_grad():
        out = tiny_rm(input_ids=ids, attention_mask=mask)
    assert out.member_rewards.shape == (4, 1) and torch.equal(out.member_rewards[:, 0], out.rewards)
    tiny_rm.save_pretrained(tmp_path / "one", tokenizer=qwen_tokenizer)
    path = tmp_path / "one" / REWARD_CONFIG
    config = json.loads(path.read_text())
    assert (config["num_heads"], config["version"]) == (1, 1)  # an align without num_heads still reads it
    del config["num_heads"]  # as written before num_heads existed
    path.write_text(json.dumps(config))
    reloaded = RewardModel.from_pretrained(tmp_path / "one").eval()
    assert reloaded.config.num_heads == 1
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids, attention_mask=mask).rewards, out.rewards)
