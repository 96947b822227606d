"""Shared pytest fixtures."""

import pytest


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """The real Qwen2 chat tokenizer (offline; built once into the align cache, then loaded from it)."""
    import chatml

    return chatml.qwen_tokenizer()


def tiny_qwen2(tokenizer, seed: int = 0, head_scale: float = 1.0, **overrides):
    """A Qwen2-architecture model small enough for CPU tests (QKV bias, untied embeddings), in eval mode.

    ``head_scale`` > 1 sharpens the random output head: near-uniform logits would leave greedy choices
    to float noise (padded vs unpadded runs differ in the last bits) and sampled log-probs bunched."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**settings)).eval()
    if head_scale != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(head_scale)
    return model


def build_tiny_qwen2(tokenizer, out_dir, seed: int = 0, **overrides):
    """``tiny_qwen2`` saved with the real Qwen tokenizer, so recipes can load it by path."""
    tiny_qwen2(tokenizer, seed, **overrides).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_qwen_dir(qwen_tokenizer, tmp_path_factory):
    """Directory of a tiny random Qwen2 model plus the real Qwen2 tokenizer and chat template."""
    return build_tiny_qwen2(qwen_tokenizer, tmp_path_factory.mktemp("tiny-qwen2"))


def byte_tokenizer(with_chatml: bool = True):
    """A byte-level tokenizer with no merges (256 ids), plus the ChatML tokens and a pad when asked.

    Its small vocabulary lets RL tests see every token sampled often, which a 151k vocabulary does not.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    if with_chatml:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "pad_token": "<|endoftext|>"}
        )
        tokenizer.eos_token = "<|im_end|>"
    return tokenizer


@pytest.fixture(scope="session")
def tiny_byte_dir(tmp_path_factory):
    """A tiny Qwen2 model over the byte tokenizer (259 ids), saved with it."""
    return build_tiny_qwen2(byte_tokenizer(), tmp_path_factory.mktemp("tiny-byte"))


ASCII_IDS = 128  # byte-tokenizer ids below this are ASCII bytes


def ascii_reward(batch, texts):
    """A rule-based reward for RL tests: the share of response tokens that are ASCII bytes."""
    hits = ((batch.response_ids < ASCII_IDS) & (batch.response_mask > 0)).sum(1).float()
    return hits / batch.lengths.clamp(min=1).float()


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    """16 generated task prompts as a JSONL of {messages}."""
    from align.tasks import generate_tasks, write_jsonl

    tasks = generate_tasks(16, seed=5)
    return write_jsonl(
        tmp_path_factory.mktemp("prompts") / "p.jsonl", [{"messages": t.messages} for t in tasks]
    )


@pytest.fixture(scope="module")
def tiny_rm_dir(tiny_byte_dir, tmp_path_factory):
    """A reward model over `tiny_byte_dir` (new scalar head, seed 0) reading the reward at <|im_end|>."""
    from transformers import AutoTokenizer

    import chatml
    from align.reward import RewardModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_byte_dir)
    _, im_end = chatml.chatml_token_ids(tokenizer)
    rm = RewardModel.from_backbone(tiny_byte_dir, end_token_id=im_end, seed=0)
    return rm.save_pretrained(tmp_path_factory.mktemp("tiny-rm"), tokenizer)
