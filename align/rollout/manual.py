"""Our own decoding loop behind the :class:`~align.rollout.RolloutEngine` interface
(``rollout_engine: manual``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from align.hf_compat import cache_kwargs
from align.rollout.batch import _BatchedEngine, _device_of, position_ids_from_mask
from align.rollout.lockstep import idle_forward, world_any
from align.rollout.sampling import sample_tokens


class ManualRolloutEngine(_BatchedEngine):
    """Our own decoding loop: prefill, then one token per step with a dynamic KV cache.

    Samples with :func:`sample_tokens` (:func:`top_p_filter`, exponential race, a ``torch.Generator`` seeded
    per call, so the global RNG is never touched). Rows that emitted a stop token are removed from the batch
    and the cache at once, so they stop costing compute (``generate`` keeps running them). With
    ``logprobs="generate"`` the log-probs come from the decoding logits at no extra cost or memory.
    Same constructor as :class:`HFRolloutEngine`.

    ``lockstep=True`` (a model sharded over the ranks, :mod:`align.rollout.lockstep`): every step first asks
    whether any rank still has a row decoding; a rank whose rows have all stopped feeds one row of padding
    through the model until none has. Its own rows are decoded exactly as without lockstep (the same
    batches, forwards and draws), so the samples are those of the whole weights.
    """

    @contextlib.contextmanager
    def _rng(self, seed: int | None, device: torch.device) -> Iterator[torch.Generator | None]:
        if seed is None:
            yield None
            return
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        yield generator

    def _decode(self, input_ids, attention_mask, max_new_tokens, temperature, top_p, stop, generator):
        from transformers import DynamicCache

        model = self.model
        device = input_ids.device
        b = input_ids.shape[0]
        tokens = torch.full((b, max_new_tokens), self.pad_id, dtype=torch.long, device=device)
        logps = torch.zeros((b, max_new_tokens), dtype=torch.float32, device=device)
        stop_t = torch.tensor(stop, dtype=torch.long, device=device)
        active = torch.arange(b, device=device)  # chunk rows still decoding
        cache = DynamicCache(config=model.config)
        positions = position_ids_from_mask(attention_mask)
        # The n samples of a prompt share its prefill: each distinct prompt runs once and every row gets
        # its prompt's cache and logits (GRPO's 8 samples: 1/8 of the prefill, most of a short rollout).
        distinct, inverse = torch.unique(input_ids, dim=0, return_inverse=True)
        shared = len(distinct) < b  # else prefill the rows as they are: no gather of the cache
        rows: torch.Tensor | slice = slice(None)
        if shared:  # one row per distinct prompt (any of its copies)
            rows = torch.empty(len(distinct), dtype=torch.long, device=device)
            rows.scatter_(0, inverse, torch.arange(b, device=device))
        logits = model(
            input_ids=input_ids[rows],
            attention_mask=attention_mask[rows],
            position_ids=positions[rows],
            **cache_kwargs(model, cache),
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        if shared:
            logits = logits[inverse]
            cache.batch_select_indices(inverse)  # every row gets its prompt's keys and values
        next_pos = positions[:, -1:] + 1
        steps = 0
        for step in range(max_new_tokens):
            if len(active):  # else (lockstep) this rank's rows have all stopped: nothing to sample
                tok, lp = sample_tokens(logits, temperature, top_p, generator)
                tokens[active, step] = tok
                logps[active, step] = lp
                steps = step + 1
            if step == max_new_tokens - 1:
                break
            keep = (
                ~torch.isin(tok, stop_t) if len(active) else torch.zeros(0, dtype=torch.bool, device=device)
            )
            alive = bool(keep.any())
            if not (world_any(alive, device) if self.lockstep else alive):
                break
            if not alive:  # lockstep: another rank's rows go on, and this rank's forwards with them
                active = active[:0]
                idle_forward(model, self.pad_id, device)
                continue
            if not bool(keep.all()):
                kept = keep.nonzero().squeeze(1)
                cache.batch_select_indices(kept)
                attention_mask, next_pos, active, tok = (
                    attention_mask[kept],
                    next_pos[kept],
                    active[kept],
                    tok[kept],
                )
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(active), 1))], dim=1)
            logits = model(
                input_ids=tok[:, None],
                attention_mask=attention_mask,
                position_ids=next_pos,
                **cache_kwargs(model, cache),
                use_cache=True,
            ).logits[:, -1]
            next_pos = next_pos + 1
        return tokens[:, :steps], (logps[:, :steps] if self.logprobs == "generate" else None)

    def _idle_chunk(self, max_new_tokens: int) -> None:
        # The forwards of `_decode` for a rank without rows: the prefill, then one per step while any rank
        # has a row decoding.
        device = _device_of(self.model)
        idle_forward(self.model, self.pad_id, device)
        for _ in range(max_new_tokens - 1):
            if not world_any(False, device):
                break
            idle_forward(self.model, self.pad_id, device)
