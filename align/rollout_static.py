"""A fixed-shape rollout engine: pre-allocated KV slots, continuous refilling, batch-invariant sampling.

:class:`StaticRolloutEngine` sits behind the same :class:`~align.rollout.RolloutEngine` interface as the
other engines. What differs from :class:`~align.rollout.ManualRolloutEngine`:

* **Static KV cache** (:class:`SlotKVCache`): per layer one (slots, kv_heads, capacity, head_dim) buffer,
  allocated once per ``generate`` call. A decoding step writes each slot's new key/value in place at the
  slot's own column and attends over the whole buffer through a 4D mask: no allocation, no concatenation,
  no re-indexing of the cache when rows finish, and every step has the same shapes (the precondition for
  CUDA graphs / ``torch.compile``). Each slot holds its prompt from column 0, unpadded, so a token's
  column is its position id.
* **Continuous refilling**: with more rows (prompts x ``n``) than ``batch_size`` slots, a slot whose row
  emitted a stop token (or hit ``max_new_tokens``) is refilled with the next row (one prefill of the new
  prompts into their slots, once ``refill_fraction`` of the slots are idle) instead of idling until the
  whole batch is done.
* **Counter-based sampling** (:func:`~align.rollout.counter_uniforms`): the race noise of row ``i`` at step
  ``t`` is a hash of ``(seed, i, t, token)``, so a row samples the same tokens whichever slot it lands in
  and whoever shares the batch with it. That keeps sampling exactly reproducible given the seed *and*
  independent of ``batch_size`` and of refilling (up to float rounding of the logits, which differs a few
  ulps between batch compositions on any engine). It is a different random stream from
  :class:`~align.rollout.ManualRolloutEngine`'s ``torch.Generator`` (same distribution, other draws):
  the two agree token for token only when greedy.

Log-probs, stop handling, the returned :class:`~align.rollout.RolloutBatch` and the constructor are those of
the other engines, plus ``compile``: on CUDA only, wrap the fixed-shape decoding step in
``torch.compile(mode="reduce-overhead")`` (CUDA graphs). **Not yet measured** (no GPU in the session that
wrote it); ignored on CPU. A slot whose row finished while no prompt is waiting still runs in the fixed-
shape step (its output is discarded): the price of static shapes at the tail of a batch.

Needs the ``sdpa`` or ``eager`` attention (a custom 4D mask); a model loaded with flash-attention is switched
to ``sdpa`` for the call and back. Sliding-window layers are refused.
"""

from __future__ import annotations

import collections
import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

from align.rollout import _BatchedEngine, _device_of
from align.sampling import counter_token_keys, counter_uniforms, sample_tokens


class SlotKVCache:
    """Per-layer key/value buffers (slots, kv_heads, capacity, head_dim), written in place.

    Duck-types the one cache method transformers' attention layers call, ``update(key, value, layer_idx)``.
    Before a forward pass the engine sets ``rows`` (k,) long: the slots the batch's rows write to, or
    ``None`` for a decoding step over every slot; and ``cols`` (k, q) long: the column of each query token.
    """

    def __init__(self, config: Any, slots: int, capacity: int, dtype: torch.dtype, device: torch.device):
        kv_heads = config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (slots, kv_heads, capacity, head_dim)
        # Zeros, not empty: masked columns must hold finite numbers (0 x NaN would poison the attention).
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [
            torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)
        ]
        self.all_slots = torch.arange(slots, device=device)
        self.rows: torch.Tensor | None = None
        self.cols = torch.zeros((slots, 1), dtype=torch.long, device=device)

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *_: Any, **__: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``key``/``value`` (k, kv_heads, q, head_dim) at (``rows``, ``cols``); return the rows' whole
        buffers (k, kv_heads, capacity, head_dim): the buffers themselves on a decoding step (no copy)."""
        kb, vb = self.keys[layer_idx], self.values[layer_idx]
        if self.rows is None:  # decoding: one new column per slot, each at its own position
            kb[self.all_slots, :, self.cols[:, 0]] = key[:, :, 0]
            vb[self.all_slots, :, self.cols[:, 0]] = value[:, :, 0]
            return kb, vb
        kb[self.rows[:, None], :, self.cols] = key.transpose(1, 2)
        vb[self.rows[:, None], :, self.cols] = value.transpose(1, 2)
        return kb[self.rows], vb[self.rows]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # unused: the engine always passes position ids


def _additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where ``allowed`` (bool, (k, 1, q, capacity)), the dtype's lowest value elsewhere (sdpa and eager)."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


class StaticRolloutEngine(_BatchedEngine):
    """Fixed-shape decoding with a static KV cache and continuous refilling (see the module docstring).

    Same constructor as :class:`~align.rollout.HFRolloutEngine` (``batch_size`` = decoding slots), plus
    ``compile``: wrap the decoding step in ``torch.compile(mode="reduce-overhead")`` on CUDA (not yet
    measured; ignored on CPU); ``refill_fraction``: refill once this share of the slots (at least one) is
    idle and prompts are waiting. Each refill is one prefill call, so refilling slot by slot costs more
    calls than it saves steps (CPU smoke bench, 6 slots: 0.25 was 3-5% faster than 1/6 or 1/2, about this
    host's noise; 1.0, i.e. waiting for the whole batch, ~25% slower). Outputs do not depend on it.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        compile: bool = False,
        refill_fraction: float = 0.25,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, tokenizer, **kwargs)
        config = model.config
        if getattr(config, "use_sliding_window", False) or "sliding_attention" in (
            getattr(config, "layer_types", None) or []
        ):
            raise ValueError("StaticRolloutEngine does not support sliding-window attention layers")
        if not 0.0 < refill_fraction <= 1.0:
            raise ValueError(f"refill_fraction must be in (0, 1], got {refill_fraction}")
        self.compile = compile
        self.refill_min = max(1, math.ceil(refill_fraction * self.batch_size))
        self._compiled: Callable | None = None

    @contextlib.contextmanager
    def _rng(self, seed: int | None, device: torch.device) -> Iterator[int]:
        # The counter-based noise needs only an integer; without a seed it is drawn from the global RNG.
        yield int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else int(seed)

    @contextlib.contextmanager
    def _mask_capable_attention(self) -> Iterator[None]:
        config = self.model.config
        saved = config._attn_implementation
        if saved not in ("sdpa", "eager"):
            config._attn_implementation = "sdpa"  # flash-attention takes no 4D mask; looked up per call
        try:
            yield
        finally:
            config._attn_implementation = saved

    def _forward(self, cache: SlotKVCache, ids: torch.Tensor, positions: torch.Tensor, mask, keep):
        return self.model(
            input_ids=ids,
            position_ids=positions,
            attention_mask=mask,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=keep,
        ).logits[:, -1]

    def _step(self, cache: SlotKVCache, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """One decoding step over every slot: ``tokens`` (S,) written at column ``lengths`` (S,); logits (S, V).

        Fixed shapes (the buffers and S never change within a call), so it can be CUDA-graphed."""
        cache.rows = None
        cache.cols = lengths[:, None]
        columns = torch.arange(cache.keys[0].shape[2], device=lengths.device)
        mask = _additive_mask((columns[None, :] <= lengths[:, None])[:, None, None, :], cache.keys[0].dtype)
        return self._forward(cache, tokens[:, None], lengths[:, None], mask, 1)

    def _prefill(self, cache: SlotKVCache, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """Write ``prompts`` into ``slots`` from column 0 (right-padded batch, causal mask); return each
        prompt's next-token logits (k, V). Padding columns are written too: masked, then overwritten."""
        device = cache.all_slots.device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        for j, p in enumerate(prompts):
            ids[j, : len(p)] = torch.tensor(p, dtype=torch.long)
        ids = ids.to(device)
        cols = torch.arange(width, device=device)
        cache.rows = torch.tensor(slots, dtype=torch.long, device=device)
        cache.cols = cols[None, :].expand(len(prompts), width)
        columns = torch.arange(cache.keys[0].shape[2], device=device)
        # Causal over the prompt's own columns; a padding query sees only earlier columns, so never nothing.
        allowed = (columns[None, :] <= cols[:, None])[None, None].expand(len(prompts), 1, width, -1)
        mask = _additive_mask(allowed, cache.keys[0].dtype)
        last = torch.tensor([len(p) - 1 for p in prompts], dtype=torch.long, device=device)
        return self._forward(cache, ids, cache.cols, mask, last[:, None])

    def _decode_rows(self, rows, order, max_new_tokens, temperature, top_p, stop, generator, done) -> None:
        """Decode every row through ``batch_size`` slots, refilling a slot as soon as its row ends."""
        if not order:
            return
        model, seed = self.model, int(generator)
        device = _device_of(model)
        n_slots = min(self.batch_size, len(order))
        capacity = max(len(rows[i]) for i in order) + max_new_tokens
        dtype = next(model.parameters()).dtype
        stop_set = set(stop)
        want_logps = self.logprobs == "generate"
        step = self._step
        if self.compile and device.type == "cuda":
            if self._compiled is None:
                self._compiled = torch.compile(self._step, mode="reduce-overhead")
            step = self._compiled

        cache = SlotKVCache(model.config, n_slots, capacity, dtype, device)
        queue = collections.deque(order)
        slot_row = [-1] * n_slots  # row decoded in each slot, -1: idle
        new: list[list[int]] = [[] for _ in range(n_slots)]
        new_lp: list[list[float]] = [[] for _ in range(n_slots)]
        lengths = torch.zeros(n_slots, dtype=torch.long, device=device)  # cache columns filled per slot
        steps = torch.zeros(n_slots, dtype=torch.long, device=device)  # tokens generated per slot
        row_ids = torch.zeros(n_slots, dtype=torch.long, device=device)
        live = torch.zeros(n_slots, dtype=torch.long, device=device)
        logits: torch.Tensor | None = None
        token_keys: torch.Tensor | None = None

        def refill(free: list[int]) -> None:
            nonlocal logits
            take = [queue.popleft() for _ in range(min(len(free), len(queue)))]
            if not take:
                return
            use = free[: len(take)]
            first = self._prefill(cache, use, [rows[i] for i in take])
            if logits is None:
                logits = first.new_zeros((n_slots, first.shape[-1]))
            idx = torch.tensor(use, dtype=torch.long, device=device)
            logits[idx] = first
            lengths[idx] = torch.tensor([len(rows[i]) for i in take], dtype=torch.long, device=device)
            row_ids[idx] = torch.tensor(take, dtype=torch.long, device=device)
            steps[idx] = 0
            live[idx] = 1
            for s, i in zip(use, take, strict=True):
                slot_row[s], new[s], new_lp[s] = i, [], []

        with self._mask_capable_attention():
            refill(list(range(n_slots)))
            while True:
                assert logits is not None
                if temperature > 0 and token_keys is None:
                    token_keys = counter_token_keys(logits.shape[-1], device)
                uniforms = counter_uniforms(seed, row_ids, steps, token_keys) if temperature > 0 else None
                tok, lp = sample_tokens(logits, temperature, top_p, uniforms=uniforms)
                tok_list = tok.tolist()
                lp_list = lp.tolist() if want_logps else None
                free = []
                for s, i in enumerate(slot_row):
                    if i < 0:
                        continue
                    new[s].append(tok_list[s])
                    if lp_list is not None:
                        new_lp[s].append(lp_list[s])
                    if tok_list[s] in stop_set or len(new[s]) == max_new_tokens:
                        done(i, new[s], new_lp[s] if want_logps else None)
                        slot_row[s] = -1
                        free.append(s)
                if free:
                    live[torch.tensor(free, dtype=torch.long, device=device)] = 0
                if all(i < 0 for i in slot_row) and not queue:
                    return
                if any(i >= 0 for i in slot_row):
                    if self.compile and device.type == "cuda":
                        torch.compiler.cudagraph_mark_step_begin()
                    logits = step(cache, tok, lengths)
                    lengths += live  # idle slots wrote a discarded column at their (fixed) length
                    steps += live
                idle = [s for s, i in enumerate(slot_row) if i < 0]
                # Refill once a few slots are idle, not each time one is: every refill is a model call.
                if queue and (len(idle) >= self.refill_min or len(idle) == n_slots):
                    refill(idle)
