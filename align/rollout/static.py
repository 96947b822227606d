"""A fixed-shape rollout engine: pre-allocated KV slots, continuous refilling, batch-invariant sampling.

:class:`StaticRolloutEngine` sits behind the same :class:`~align.rollout.RolloutEngine` interface as the
other engines. What differs from :class:`~align.rollout.manual.ManualRolloutEngine`:

* **Static KV cache** (:class:`SlotKVCache`): per layer one (slots, kv_heads, capacity, head_dim) buffer,
  allocated once per ``generate`` call (kept per shape bucket when compiled). A decoding step writes each
  slot's new key/value in place at the slot's own column and attends over the whole buffer through a 4D
  mask: no allocation, no concatenation, no re-indexing of the cache when rows finish, and every step has
  the same shapes (the precondition for CUDA graphs / ``torch.compile``). Each slot holds its prompt from
  column 0, unpadded, so a token's column is its position id.
* **Continuous refilling**: with more rows (prompts x ``n``) than ``batch_size`` slots, a slot whose row
  emitted a stop token (or hit ``max_new_tokens``) is refilled with the next row (one prefill of the new
  prompts into their slots, once ``refill_fraction`` of the slots are idle) instead of idling until the
  whole batch is done.
* **Counter-based sampling** (:func:`~align.rollout.sampling.counter_uniforms`): the race noise of row ``i`` at step
  ``t`` is a hash of ``(seed, i, t, token)``, so a row samples the same tokens whichever slot it lands in
  and whoever shares the batch with it. That keeps sampling exactly reproducible given the seed *and*
  independent of ``batch_size`` and of refilling (up to float rounding of the logits, which differs a few
  ulps between batch compositions on any engine). It is a different random stream from
  :class:`~align.rollout.manual.ManualRolloutEngine`'s ``torch.Generator`` (same distribution, other draws):
  the two agree token for token only when greedy.
* **CUDA-graph decoding** (``compile``, the RL configs' ``rollout_compile``; default on for CUDA): the
  whole step (forward, top-p by one full sort, counter-based sampling, stop test:
  :meth:`StaticRolloutEngine._decode_step`) works in place on fixed device buffers marked static
  (``torch._dynamo.mark_static_address``) and is compiled with ``mode="reduce-overhead"``,
  ``fullgraph=True``. **Recompile guard**: the call's scalars (seed, temperature, top-p, max_new_tokens)
  are 0-d tensors in the decoding state, so changing them compiles nothing; a compilation happens once per
  *shape*: (slots, cache columns, max_new_tokens, stop ids) each rounded up to a power of two, greedy or
  sampled, cache dtype. Each engine counts its own compilations (``isolate_recompiles``) against torch's
  ``recompile_limit`` (8); an RL run keeps its slots and sampling fixed, so it meets one shape per cache
  bucket its prompts reach. Past the limit the engine raises a ``RuntimeError`` naming the shapes it
  compiled and the two ways out (raise the limit, or ``rollout_compile=off``) instead of torch's
  ``FailOnRecompileLimitHit`` (it does not fall back to eager on its own: that would silently slow the
  run). Every compiled call reads inductor's CUDA-graph skip counter before and after (any call may
  compile: a failed guard recompiles within a shape), and the engine raises instead of running eager. The
  eager engine runs the very same step and sampler (:func:`~align.rollout.sampling.sample_tokens_graph`), so
  ``compile`` changes no token beyond the compiled kernels' float rounding. **Not yet measured on a GPU**;
  on CPU the same step function runs eager (tests), or compiled without graphs (``compile="on"``, a slow
  test).
* **Compute dtype**: the KV cache takes the dtype the model computes in (:func:`compute_dtype`): the
  autocast dtype when autocast is on for the model's device (the RL loops sample under the training
  precision, bf16 on GPU), else the weights'. Log-probs are float32 either way. Under autocast a compiled
  step casts the fp32 master weights to bf16 inside the graph, every step (not yet measured on a GPU).

Log-probs, stop handling, the returned :class:`~align.rollout.RolloutBatch` and the constructor are those of
the other engines. A slot whose row finished while no prompt is waiting still runs in the fixed-shape step
(its output is discarded): the price of static shapes at the tail of a batch.

Needs the ``sdpa`` or ``eager`` attention (a custom 4D mask); a model loaded with flash-attention is switched
to ``sdpa`` for the call and back. Sliding-window layers are refused.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

from align.hf_compat import cache_kwargs
from align.rollout.batch import _BatchedEngine, _device_of
from align.rollout.lockstep import refuse_lockstep
from align.rollout.sampling import counter_token_keys, counter_uniforms, sample_tokens_graph


class SlotKVCache:
    """Per-layer key/value buffers (slots, kv_heads, capacity, head_dim), written in place.

    Duck-types the one cache method transformers' attention layers call, ``update(key, value, layer_idx)``.
    Before a forward pass the engine sets ``rows`` (k,) long: the slots the batch's rows write to, or
    ``None`` for a decoding step over every slot; and ``cols`` (k, q) long: the column of each query token.
    """

    def __init__(self, config: Any, slots: int, capacity: int, dtype: torch.dtype, device: torch.device):
        # GPT-2's config has no num_key_value_heads: one K/V head per attention head.
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
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
        # Under autocast rotary leaves the keys in float32 (cos/sin follow the fp32 residual stream): the
        # cache stores the compute dtype, which is what autocast's attention would cast them to anyway.
        key, value = key.to(kb.dtype), value.to(vb.dtype)
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


def _bucket(n: int, least: int = 1) -> int:
    """The next power of two >= max(n, least): shapes come from few buckets, so few graphs/compilations."""
    return 1 << max(0, (max(n, least) - 1).bit_length())


class _DecodeState:
    """Per-slot decoding state, device tensors of fixed shape (S slots, W = ``max_new_tokens`` rounded up
    to a power of two), written in place (by the eager refill and by the captured step alike) so that a
    CUDA graph can read and write them.

    ``tok`` (S,) the last sampled token (fed to the next step); ``lengths`` (S,) the cache column it goes to;
    ``steps`` (S,) tokens sampled so far; ``live`` (S,) bool; ``row_ids`` (S,) the row each slot decodes;
    ``out_tok``/``out_lp`` (S, W + 1) the sampled tokens and their log-probs (column W takes the writes
    of finished or idle slots); ``stop_ids`` (K,) long, the stop set padded with -1 (no token) to a power of
    two. The call's scalars are 0-d tensors, so that a compiled step does not recompile when they change:
    ``seed`` long, ``max_new`` long, ``temperature`` and ``top_p`` float32.
    """

    def __init__(self, slots: int, width: int, stop_width: int, device: torch.device) -> None:
        def zeros(*shape: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        self.tok, self.lengths, self.steps, self.row_ids = (
            zeros(slots),
            zeros(slots),
            zeros(slots),
            zeros(slots),
        )
        self.live = zeros(slots, dtype=torch.bool)
        self.out_tok = zeros(slots, width + 1)
        self.out_lp = zeros(slots, width + 1, dtype=torch.float32)
        self.stop_ids = zeros(stop_width)
        self.seed, self.max_new = zeros(), zeros()
        self.temperature, self.top_p = zeros(dtype=torch.float32), zeros(dtype=torch.float32)

    def set_call(self, seed: int, max_new: int, temperature: float, top_p: float, stop: list[int]) -> None:
        """One ``generate`` call's scalars and stop set, written in place."""
        self.seed.fill_(seed)
        self.max_new.fill_(max_new)
        # Greedy ignores the temperature; its log-probs are at T = 1 (see align.rollout.batch).
        self.temperature.fill_(temperature if temperature > 0 else 1.0)
        self.top_p.fill_(top_p)
        stops = sorted(set(stop))
        self.stop_ids.fill_(-1)
        self.stop_ids[: len(stops)] = torch.tensor(stops, dtype=torch.long)

    def tensors(self) -> list[torch.Tensor]:
        return [
            self.tok,
            self.lengths,
            self.steps,
            self.row_ids,
            self.live,
            self.out_tok,
            self.out_lp,
            self.stop_ids,
            self.seed,
            self.max_new,
            self.temperature,
            self.top_p,
        ]


def sample_into(
    state: _DecodeState, logits: torch.Tensor, idx: torch.Tensor, token_keys: torch.Tensor | None
) -> None:
    """Sample the next token of slots ``idx`` (k,) from ``logits`` (k, V), record it, and test for stop.

    ``token_keys`` ``None`` is greedy. The noise of a slot is ``counter_uniforms(seed, row, step)``, so a
    row draws the same tokens in any slot. Eager refills and the compiled step run this very function
    (:func:`~align.rollout.sampling.sample_tokens_graph`: full sort, tensor knobs), so compile on or off samples
    alike. Only live slots advance; a stop id, or the ``max_new``-th token, ends its slot. No host sync.
    """
    rows, t, live = state.row_ids[idx], state.steps[idx], state.live[idx]
    uniforms = counter_uniforms(state.seed, rows, t, token_keys) if token_keys is not None else None
    tok, lp = sample_tokens_graph(logits, state.temperature, state.top_p, uniforms)
    col = torch.where(live, t, state.out_tok.shape[1] - 1)
    state.out_tok[idx, col] = tok
    state.out_lp[idx, col] = lp
    state.tok[idx] = tok
    state.steps[idx] = t + live.long()
    state.live[idx] = live & ~torch.isin(tok, state.stop_ids) & (t + 1 < state.max_new)


def _recompile_limit_hit() -> Any:
    """What torch raises past the recompile limit under fullgraph=True (looked up when needed: importing
    torch._dynamo costs a second)."""
    from torch._dynamo import exc

    return getattr(exc, "FailOnRecompileLimitHit", ())  # the name of torch >= 2.6


def cudagraph_skips() -> int:
    """How many times inductor has fallen back from CUDA graphs in this process."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def require_graphs(skips_before: int) -> None:
    """Raise if inductor skipped CUDA graphs since ``skips_before`` (a `cudagraph_skips` reading)."""
    if cudagraph_skips() != skips_before:
        raise RuntimeError(
            "StaticRolloutEngine: inductor skipped CUDA graphs for the decoding step (see its 'skipping "
            "cudagraphs' log line), so it would run eager and launch-bound. Set rollout_compile=off to run "
            "eager on purpose."
        )


def compute_dtype(model: Any, device: torch.device) -> torch.dtype:
    """The dtype the model's activations (hence its keys and values) come out in: autocast's where it is
    enabled on ``device`` (the RL loops' bf16 on GPU), else the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(model.parameters()).dtype


class StaticRolloutEngine(_BatchedEngine):
    """Fixed-shape decoding with a static KV cache and continuous refilling (see the module docstring).

    Same constructor as :class:`~align.rollout.HFRolloutEngine` (``batch_size`` = decoding slots), plus
    ``compile``: ``auto`` (default: on for CUDA, off elsewhere), ``on`` or ``off`` (bools accepted). On CUDA,
    ``on`` captures the whole decoding step (forward, top-p, sampling, stop test; :meth:`_decode_step`) in
    CUDA graphs through ``torch.compile(mode="reduce-overhead")``, one graph per shape bucket (see the
    module docstring's recompile guard), and raises if inductor skips the graphs or torch's recompile limit
    is reached (instead of running eager silently). Elsewhere ``on`` compiles
    without graphs (a check of the traced step). ``refill_fraction``: refill once this share of the slots
    (at least one) is idle and prompts are waiting. Each refill is one prefill call, so refilling slot by
    slot costs more calls than it saves steps (CPU smoke bench, 6 slots: 0.25 was 3-5% faster than 1/6 or
    1/2, about this host's noise; 1.0, i.e. waiting for the whole batch, ~25% slower). ``check_every``: steps
    between two looks at which slots finished (the only host syncs of the loop; default 8 on CUDA, 1
    elsewhere). Outputs depend on none of these.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        compile: str | bool = "auto",
        refill_fraction: float = 0.25,
        check_every: int | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("lockstep"):
            refuse_lockstep(
                "static",
                "it refills finished slots with waiting rows and decodes each rank's slots to their own end, "
                "so ranks would run different numbers of forwards (and a compiled step cannot run FSDP's "
                "hooks); use rollout_engine=manual or hf, or rollout_sharded=unshard",
            )
        super().__init__(model, tokenizer, **kwargs)
        # Resolved here, not in the traced step: dynamo does not honour functools.cache.
        (self._cache_key,) = cache_kwargs(model, None)
        config = model.config
        if getattr(config, "use_sliding_window", False) or "sliding_attention" in (
            getattr(config, "layer_types", None) or []
        ):
            raise ValueError("StaticRolloutEngine does not support sliding-window attention layers")
        if not 0.0 < refill_fraction <= 1.0:
            raise ValueError(f"refill_fraction must be in (0, 1], got {refill_fraction}")
        compile = {True: "on", False: "off"}.get(compile, compile)  # type: ignore[call-overload]
        if compile not in ("auto", "on", "off"):
            raise ValueError(f"compile must be auto, on or off, got {compile!r}")
        if check_every is not None and check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        self.compile = compile
        self.check_every = check_every
        self.refill_min = max(1, math.ceil(refill_fraction * self.batch_size))
        self._compiled: Callable | None = None
        # The shapes this engine's compiled step has run (each one compilation), for the limit's message.
        self.compiled_shapes: set[tuple[Any, ...]] = set()
        self.cache_dtype: torch.dtype | None = None  # the KV cache's dtype in the last call
        self._buffers: dict[tuple[Any, ...], tuple[SlotKVCache, _DecodeState]] = {}

    def _compiling(self, device: torch.device) -> bool:
        return self.compile == "on" or (self.compile == "auto" and device.type == "cuda")

    @contextlib.contextmanager
    def _rng(self, seed: int | None, device: torch.device) -> Iterator[int]:
        # The counter-based noise needs only an integer; without a seed it is drawn from the global RNG.
        yield int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else int(seed)

    @contextlib.contextmanager
    def _mask_capable_attention(self) -> Iterator[None]:
        config = self.model.config
        saved = config._attn_implementation
        if saved not in ("sdpa", "eager"):
            config._attn_implementation = "sdpa"  # flash/varlen kernels take no 4D mask; looked up per call
        try:
            yield
        finally:
            config._attn_implementation = saved

    def _forward(self, cache: SlotKVCache, ids: torch.Tensor, positions: torch.Tensor, mask, keep):
        return self.model(
            input_ids=ids,
            position_ids=positions,
            attention_mask=mask,
            use_cache=True,
            **{self._cache_key: cache},
            logits_to_keep=keep,
        ).logits[:, -1]

    def _step(self, cache: SlotKVCache, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """One forward over every slot: ``tokens`` (S,) written at column ``lengths`` (S,); logits (S, V)."""
        cache.rows = None
        cache.cols = lengths[:, None]
        columns = torch.arange(cache.keys[0].shape[2], device=lengths.device)
        mask = _additive_mask((columns[None, :] <= lengths[:, None])[:, None, None, :], cache.keys[0].dtype)
        return self._forward(cache, tokens[:, None], lengths[:, None], mask, 1)

    def _decode_step(self, cache: SlotKVCache, state: _DecodeState, token_keys: torch.Tensor | None) -> None:
        """The whole decoding step, in place on ``cache`` and ``state``: forward every slot's last token,
        then sample (``token_keys`` None: greedy), record and stop-test (:func:`sample_into`). Fixed
        shapes, no host sync: the function that is CUDA-graphed; eager runs the very same function. Greedy
        or not is its only Python-level choice: the call's scalars are tensors in ``state``."""
        logits = self._step(cache, state.tok, state.lengths)
        state.lengths.add_(state.live.long())
        sample_into(state, logits, cache.all_slots, token_keys)

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

    def _buffers_for(
        self,
        slots: int,
        capacity: int,
        width: int,
        stop_width: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> tuple[SlotKVCache, _DecodeState]:
        """The cache and state of one shape bucket, allocated once and reused, so a captured graph keeps
        reading and writing the same addresses."""
        if not self._compiling(device):  # eager: nothing to keep between calls
            cache = SlotKVCache(self.model.config, slots, capacity, dtype, device)
            return cache, _DecodeState(slots, width, stop_width, device)
        key = (slots, capacity, width, stop_width, dtype, device)
        if key not in self._buffers:
            cache = SlotKVCache(self.model.config, slots, capacity, dtype, device)
            state = _DecodeState(slots, width, stop_width, device)
            for t in [*cache.keys, *cache.values, cache.all_slots, *state.tensors()]:
                torch._dynamo.mark_static_address(t)
            self._buffers[key] = (cache, state)
        return self._buffers[key]

    def _compiled_step(self, device: torch.device) -> Callable:
        if self._compiled is None:
            mode = "reduce-overhead" if device.type == "cuda" else None
            # isolate_recompiles: the step's code object is shared by every engine in the process; each
            # engine counts only its own compilations against torch's recompile_limit (torch >= 2.13;
            # older ones share the count, which changes when the limit is met, not what is sampled).
            isolate = "isolate_recompiles" in inspect.signature(torch.compile).parameters
            self._compiled = torch.compile(
                self._decode_step,
                mode=mode,
                dynamic=False,
                fullgraph=True,
                **({"isolate_recompiles": True} if isolate else {}),
            )
        return self._compiled

    def _run_step(
        self, step: Callable, cache: SlotKVCache, state: _DecodeState, token_keys: torch.Tensor | None
    ) -> None:
        if step is not self._compiled:  # eager
            step(cache, state, token_keys)
            return
        shape = (cache.all_slots.numel(), cache.keys[0].shape[2], state.out_tok.shape[1] - 1)
        shape += (state.stop_ids.numel(), "greedy" if token_keys is None else "sampled", cache.keys[0].dtype)
        if cache.all_slots.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        # Read around every call, not only a shape's first: any call may compile (a guard that fails
        # recompiles within a shape), and every compilation may skip the graphs.
        skips = cudagraph_skips()
        try:
            step(cache, state, token_keys)
        except _recompile_limit_hit() as error:
            raise RuntimeError(self._recompile_limit_message(shape)) from error
        require_graphs(skips)
        self.compiled_shapes.add(shape)

    def _recompile_limit_message(self, shape: tuple[Any, ...]) -> str:
        limit = torch._dynamo.config.recompile_limit
        seen = ", ".join(map(str, sorted(self.compiled_shapes, key=str))) or "none"
        return (
            f"StaticRolloutEngine: torch.compile hit its recompile limit (torch._dynamo.config."
            f"recompile_limit = {limit}) on decoding shape {shape} (slots, cache columns, max_new_tokens "
            f"bucket, stop ids, greedy/sampled, dtype); shapes compiled so far: {seen}. Temperature, top-p, "
            "seed and max_new_tokens are tensors and never recompile; each new shape (power-of-two buckets "
            "of rows, prompt + response length) does. Raise torch._dynamo.config.recompile_limit, or set "
            "rollout_compile=off to decode eager (the same step function, slower)."
        )

    def _decode_rows(self, rows, order, max_new_tokens, temperature, top_p, stop, generator, done) -> None:
        """Decode every row through the slots, refilling slots whose rows ended; looks at the device state
        every ``check_every`` steps only."""
        if not order:
            return
        model = self.model
        device = _device_of(model)
        compiling = self._compiling(device)
        # Buckets bound the number of distinct shapes (graphs, compilations) across calls.
        n_slots = min(self.batch_size, _bucket(len(order))) if compiling else min(self.batch_size, len(order))
        need = max(len(rows[i]) for i in order) + max_new_tokens
        capacity = _bucket(need, 64) if compiling else need
        width = _bucket(max_new_tokens) if compiling else max_new_tokens
        dtype = self.cache_dtype = compute_dtype(model, device)
        want_logps = self.logprobs == "generate"
        check_every = self.check_every or (8 if device.type == "cuda" else 1)
        step = self._compiled_step(device) if compiling else self._decode_step

        cache, state = self._buffers_for(n_slots, capacity, width, _bucket(len(set(stop)), 4), dtype, device)
        state.live.zero_()
        state.set_call(int(generator), max_new_tokens, temperature, top_p, stop)
        token_keys = None
        queue = collections.deque(order)
        slot_row = [-1] * n_slots  # row decoded in each slot, -1: idle

        def refill(free: list[int]) -> None:
            nonlocal token_keys
            take = [queue.popleft() for _ in range(min(len(free), len(queue)))]
            if not take:
                return
            use = free[: len(take)]
            logits = self._prefill(cache, use, [rows[i] for i in take])
            if temperature > 0 and token_keys is None:
                token_keys = counter_token_keys(logits.shape[-1], device)
            idx = torch.tensor(use, dtype=torch.long, device=device)
            state.lengths[idx] = torch.tensor([len(rows[i]) for i in take], dtype=torch.long, device=device)
            state.row_ids[idx] = torch.tensor(take, dtype=torch.long, device=device)
            state.steps[idx] = 0
            state.live[idx] = True
            sample_into(state, logits, idx, token_keys)
            for s, i in zip(use, take, strict=True):
                slot_row[s] = i

        def harvest() -> list[int]:
            """Hand finished rows to ``done``; return the idle slots (one look at the device state)."""
            live = state.live.tolist()
            ended = [s for s, i in enumerate(slot_row) if i >= 0 and not live[s]]
            if ended:
                idx = torch.tensor(ended, dtype=torch.long, device=device)
                counts = state.steps[idx].tolist()
                toks = state.out_tok[idx].tolist()
                lps = state.out_lp[idx].tolist() if want_logps else None
                for j, s in enumerate(ended):
                    n = counts[j]
                    done(slot_row[s], toks[j][:n], lps[j][:n] if lps is not None else None)
                    slot_row[s] = -1
            return [s for s, i in enumerate(slot_row) if i < 0]

        with self._mask_capable_attention():
            refill(list(range(n_slots)))
            while True:
                idle = harvest()
                if len(idle) == n_slots and not queue:
                    return
                # Refill once a few slots are idle, not each time one is: every refill is a model call.
                if queue and (len(idle) >= self.refill_min or len(idle) == n_slots):
                    refill(idle)
                for _ in range(check_every):
                    self._run_step(step, cache, state, token_keys)
