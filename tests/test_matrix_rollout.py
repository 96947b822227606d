"""The rollout engines token for token under greedy decoding, on the four tiny architectures of
tests/tiny_archs.py: ragged prompt lengths (1 to 12 tokens), left padding (HF, manual) and slot refilling
(static), each against every prompt decoded alone."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from tiny_archs import ARCHITECTURES, tiny_causal_lm

from align.rollout.batch import HFRolloutEngine
from align.rollout.manual import ManualRolloutEngine
from align.rollout.static import StaticRolloutEngine

# pad 0, eos 1 (tiny_config's); stop on eos, which random models rarely emit: rows end at max_new_tokens.
TOKENIZER = SimpleNamespace(pad_token_id=0, eos_token_id=1)
rng = random.Random(0)
PROMPTS = [[rng.randrange(2, 128) for _ in range(n)] for n in (1, 3, 7, 12, 5)]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_engines_decode_greedy_like_each_prompt_alone(arch):
    model = tiny_causal_lm(arch, attn_implementation="sdpa")
    kw = dict(n=2, max_new_tokens=6, temperature=0.0)
    alone = HFRolloutEngine(model, TOKENIZER, batch_size=1, stop=[1], logprobs="generate")
    reference = [alone.generate([p], **kw) for p in PROMPTS]
    for cls in (HFRolloutEngine, ManualRolloutEngine, StaticRolloutEngine):
        # 3 rows at a time for 10 rows: left-padded chunks (HF, manual), refilled slots (static).
        batch = cls(model, TOKENIZER, batch_size=3, stop=[1], logprobs="generate").generate(PROMPTS, **kw)
        for i, ref in enumerate(reference):
            rows = slice(2 * i, 2 * i + 2)
            assert batch.responses()[rows] == ref.responses(), (cls.__name__, i)
            width = ref.response_ids.shape[1]
            assert torch.allclose(batch.logprobs[rows, :width], ref.logprobs, atol=1e-5, rtol=0), cls.__name__
