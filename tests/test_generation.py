"""Batched evaluation generation on a tiny Qwen2 (from config) and on scripted stand-in models."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_qwen2

import chatml
from align.evaluation.generation import generate, generate_ids, stop_token_ids, verifier_accuracy
from align.tasks import KINDS, generate_tasks, wrong_answer


@pytest.fixture(scope="module")
def tok():
    return chatml.qwen_tokenizer()


@pytest.fixture(scope="module")
def tiny(tok):
    # Special-token ids left out of the config: generation must stop on the ids it is given.
    return tiny_qwen2(tok, head_scale=50.0, max_position_embeddings=256, eos_token_id=None, pad_token_id=None)


PROMPTS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "What is 12 + 30? Answer with just the number."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one, please, and make it a warm colour this time."},
    ],
    [{"role": "user", "content": "Ok?"}],
]


def test_left_padded_batch_equals_each_prompt_alone(tiny, tok):
    batched = generate_ids(tiny, tok, PROMPTS, max_new_tokens=6, batch_size=4, show_progress=False)
    alone = [
        generate_ids(tiny, tok, [p], max_new_tokens=6, batch_size=1, show_progress=False)[0] for p in PROMPTS
    ]
    assert batched == alone
    assert all(1 <= len(x) <= 6 for x in batched)
    # And the text view is the decoded new tokens, in input order.
    texts = generate(tiny, tok, PROMPTS, max_new_tokens=6, batch_size=3, show_progress=False)
    assert texts == tok.batch_decode(alone, skip_special_tokens=True)


def test_sampling_is_seeded_and_leaves_global_rng_alone(tiny, tok):
    state = torch.get_rng_state()
    kw = dict(max_new_tokens=5, do_sample=True, temperature=1.5, top_p=0.9, show_progress=False)
    a = generate_ids(tiny, tok, PROMPTS, seed=7, **kw)
    b = generate_ids(tiny, tok, PROMPTS, seed=7, **kw)
    assert a == b
    assert torch.equal(state, torch.get_rng_state())
    tiny.train()
    generate_ids(tiny, tok, PROMPTS[:1], max_new_tokens=2, show_progress=False)
    assert tiny.training  # the caller's mode is restored
    tiny.eval()


class Scripted(torch.nn.Module):
    """A stand-in LM whose ``generate`` replies from a function of the (unpadded) prompt text."""

    def __init__(self, tok, reply):
        super().__init__()
        self.tok, self.reply = tok, reply
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    def generate(self, input_ids, attention_mask, **kw):
        self.calls.append((input_ids.clone(), attention_mask.clone(), kw))
        _, im_end = chatml.chatml_token_ids(self.tok)
        rows = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            assert mask[-1] == 1  # left padding: the prompt ends at the right edge
            prompt = self.tok.decode(ids[mask.bool()].tolist())
            # Reply, close the turn, then junk that generation must cut off.
            rows.append(self.tok.encode(self.reply(prompt), add_special_tokens=False) + [im_end, 11, 12])
        width = max(map(len, rows))
        pad = kw["pad_token_id"]
        new = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)


def test_generate_order_stop_and_kwargs(tok):
    # Reply with the prompt's token count, so we can see each reply went to its own prompt.
    model = Scripted(tok, lambda p: str(len(tok.encode(p, add_special_tokens=False))))
    prompts = [[{"role": "user", "content": "word " * k}] for k in (3, 9, 1, 5, 7)]
    out = generate(model, tok, prompts, batch_size=2, show_progress=False)
    assert out == [str(len(chatml.encode_prompt(p, tok))) for p in prompts]
    assert len(model.calls) == 3
    ids, mask, kw = model.calls[0]
    assert kw["eos_token_id"][0] == tok.convert_tokens_to_ids("<|im_end|>")
    assert kw["pad_token_id"] == tok.pad_token_id and kw["do_sample"] is False and kw["use_cache"]
    assert (ids[mask == 0] == tok.pad_token_id).all()
    raw = generate_ids(model, tok, prompts[:1], show_progress=False)[0]
    assert raw[-1] == stop_token_ids(tok)[0]  # the stop token is kept in ids, junk after it is not
    # default_system is rendered into the prompt.
    sys_model = Scripted(tok, lambda p: "SYS" if "<|im_start|>system\nBe terse." in p else "none")
    assert (
        generate(sys_model, tok, prompts[:2], default_system="Be terse.", show_progress=False) == ["SYS"] * 2
    )
    assert generate(model, tok, [], show_progress=False) == []


def _oracle(tok, tasks, wrong=False):
    by_prompt = {chatml.render_conversation(t.messages, add_generation_prompt=True): t for t in tasks}

    def reply(prompt):
        t = by_prompt[prompt]
        return wrong_answer(t, 0) if wrong else t.answer

    return Scripted(tok, reply)


def test_verifier_accuracy(tok):
    tasks = generate_tasks(2 * len(KINDS), seed=0, split="heldout")
    res = verifier_accuracy(_oracle(tok, tasks), tok, tasks, batch_size=4, show_progress=False, n_samples=5)
    assert res["accuracy"] == 1.0 and res["n"] == res["correct"] == len(tasks)
    assert set(res["per_kind"]) == set(KINDS)
    assert all(v == {"n": 2, "correct": 2, "accuracy": 1.0} for v in res["per_kind"].values())
    assert len(res["samples"]) == 5 and len({s["kind"] for s in res["samples"]}) == 5
    assert all(s["ok"] and s["response"] == s["answer"] for s in res["samples"])
    bad = verifier_accuracy(_oracle(tok, tasks, wrong=True), tok, tasks, show_progress=False)
    assert bad["accuracy"] == 0.0 and bad["correct"] == 0
