"""Rollout engines for PPO, GRPO and online DPO: ``n`` sampled responses per prompt, with their log-probs.

One narrow interface, :class:`RolloutEngine` (``generate(prompts, n, max_new_tokens, temperature, top_p,
stop, seed) -> RolloutBatch``), so that faster engines (static cache, CUDA graphs, vLLM) slot in behind
it without touching the training loops. This module holds the interface, the batch it returns
(:class:`RolloutBatch`), the machinery every engine shares (:class:`_BatchedEngine`), and one engine:

* :class:`HFRolloutEngine`: transformers' ``model.generate`` (left padding, KV cache), every sampling
  knob set explicitly so a checkpoint's ``generation_config`` cannot change what is sampled.

The others live in their own modules, picked by name with :func:`align.rollout.engines.engine_class` (the
configs' ``rollout_engine``): :class:`align.rollout.manual.ManualRolloutEngine` (our own decoding loop:
dynamic KV cache, :func:`align.rollout.sampling.top_p_filter`, per-row stop, finished rows dropped from the batch
so they stop costing compute), :class:`align.rollout.static.StaticRolloutEngine` (pre-allocated KV slots,
fixed-shape steps, finished slots refilled with the next prompt, batch-invariant counter-based sampling)
and :class:`align.rollout.vllm.VLLMRolloutEngine` (optional, needs vLLM). The sampling itself is in
:mod:`align.rollout.sampling`.

Sampling semantics, shared by every engine:

* ``temperature > 0``: sample from ``softmax(logits / temperature)`` restricted to the nucleus of mass
  ``top_p`` (the smallest set of most likely tokens whose mass reaches ``top_p``; see :func:`align.rollout.sampling.top_p_filter`)
  and renormalised. ``temperature == 0``: greedy (argmax).
* **Log-probs** (``RolloutBatch.logprobs``) are ``log_softmax(logits / temperature)[token]``: the model's
  plain softmax at the sampling temperature, *without* the top-p truncation and renormalisation (at
  ``temperature == 0`` the temperature is taken as 1). This is the distribution PPO's ratio and the KL to
  the reference model are computed against, by a training forward pass that divides its logits by the
  same temperature.
* By default (``logprobs="forward"``) they come from one teacher-forced forward pass over prompt +
  response after decoding (:func:`teacher_forced_logprobs`), not from the decoding logits. Why, measured
  on 2 busy CPU cores in fp32:

  - accuracy: against a per-row unpadded teacher-forced pass both sources agree to the same fp32 rounding
    (tiny Qwen2: <= 6e-6; SmolLM2-135M: 1-3e-5 either way). In bf16 (random Qwen2, hidden 256) both differ
    from a per-row pass by up to 0.2 nats; what matters for PPO is that the old log-probs equal what the
    training step recomputes, and a forward pass in the :meth:`RolloutBatch.sequences` layout is that
    computation, so the first ratio is 1. It also gives every engine the same numbers, whatever kernels it
    decodes with (vLLM's log-probs come from its own).
  - cost: SmolLM2-135M, 16 rows x 48 new tokens, top-p 0.9: ``generate`` 6.3 s, the extra pass 1.5 s
    (+24%; the manual engine with decoding log-probs 5.3 s). Random Qwen2 (hidden 256, 4 layers), 8 x 64:
    6.5 s against 0.45 s (+7%). On a GPU, where decoding is memory-bound, the share should be smaller
    (not measured here: no GPU).
  - memory: ``output_logits`` holds B x R x V floats until the end (311 MB at 8 x 64; 20 GB at 128 x 256
    with Qwen's 152k vocabulary); the pass is chunked (``logprob_batch_size`` rows, R + 1 logit positions).

  ``logprobs="generate"`` takes them from the decoding logits instead (HF: ``output_logits``; manual
  engine: streamed per step at no memory cost); ``"none"`` skips them (evaluation).
* **Precision**: engines decode in the caller's precision. The RL loops call them under the training
  autocast (:func:`align.train.rl_run.sample_rollouts`: bf16 over the fp32 master weights on GPU, plain
  fp32 on CPU), so rollouts run in the dtype the training forward does, and the static engine allocates its
  KV cache in that dtype; log-probs are float32 in every case.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator, Sequence
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

import torch

import chatml
from align.rollout.lockstep import distributed, world_max

LogprobSource = Literal["forward", "generate", "none"]


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids (B, T) for a padded batch: 0, 1, ... over the real tokens of each row, 0 on pads.

    transformers' Qwen2/Llama number positions 0..T-1 when ``position_ids`` is not given, which is wrong for
    left-padded rows; ``generate`` computes exactly this, so forward passes must pass it to agree.
    """
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def left_padded(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id rows left-padded to the longest: ``(ids, mask)``, both (len(rows), width) long, mask 1 on
    real tokens. Every row ends in the last column, where generation (or a cached pass) continues."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


# --------------------------------------------------------------------------------------------------------
# The batch
# --------------------------------------------------------------------------------------------------------


class Sequences(NamedTuple):
    """Full prompt + response sequences for a scoring or training forward pass."""

    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long, 1 on prompt and response tokens
    response_start: torch.Tensor  # (B,) long, column of each row's first response token


@dataclasses.dataclass
class RolloutBatch:
    """``n`` responses per prompt, grouped: prompt ``i``'s samples are rows ``i*n .. i*n+n-1``.

    B = number of prompts x ``n``; R = the longest response in the batch. Tensors live on the device of the
    model that generated them.

    * ``prompt_ids``: B lists of token ids (the prompt of each row, unpadded).
    * ``response_ids``: (B, R) long, right-padded with ``pad_id``; includes the stop token when emitted;
      nothing after the stop token survives (HF's fill tokens are replaced by ``pad_id``).
    * ``response_mask``: (B, R) long, 1 on generated tokens including the stop token, 0 on padding.
    * ``logprobs``: (B, R) float32, ``log_softmax(logits / temperature)`` of each generated token (T = 1 for
      greedy), 0 on padding; ``None`` when the engine was asked for no log-probs.
    * ``finished``: (B,) bool, the response emitted a stop token (False: cut by ``max_new_tokens``; such a
      response gets the "never closed" penalty).
    * ``prompt_index``: (B,) long, index of each row's prompt in the ``prompts`` passed to ``generate``.
    * ``lengths``: (B,) long, ``response_mask.sum(1)``.
    """

    prompt_ids: list[list[int]]
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor | None
    finished: torch.Tensor
    prompt_index: torch.Tensor
    lengths: torch.Tensor
    n: int
    pad_id: int
    temperature: float = 1.0
    top_p: float = 1.0

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @classmethod
    def from_responses(
        cls,
        prompt_ids: Sequence[Sequence[int]],
        responses: Sequence[Sequence[int]],
        finished: Sequence[bool],
        pad_id: int,
    ) -> RolloutBatch:
        """Responses given as token ids (stop token included where emitted), one row per prompt (``n`` = 1,
        no log-probs), right-padded with ``pad_id``: replies recorded earlier or written by hand, for the
        reward model to score (`align.train.rl_common.score_rollouts`)."""
        if not len(prompt_ids) == len(responses) == len(finished):
            raise ValueError("prompt_ids, responses and finished need one entry per row")
        width = max([len(r) for r in responses] + [1])
        ids = torch.full((len(responses), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(responses):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(list(r), dtype=torch.long), 1
        return cls(
            prompt_ids=[list(p) for p in prompt_ids],
            response_ids=ids,
            response_mask=mask,
            logprobs=None,
            finished=torch.tensor(list(finished), dtype=torch.bool),
            prompt_index=torch.arange(len(responses)),
            lengths=mask.sum(1),
            n=1,
            pad_id=pad_id,
        )

    def select(self, rows: list[int]) -> RolloutBatch:
        """These rows as a batch of their own (``n`` = 1, no log-probs), trimmed to their longest response
        (at least one column)."""
        index = torch.tensor(rows, dtype=torch.long, device=self.response_ids.device)
        width = max(int(self.lengths[index].max()), 1)
        return RolloutBatch(
            prompt_ids=[self.prompt_ids[i] for i in rows],
            response_ids=self.response_ids[index, :width],
            response_mask=self.response_mask[index, :width],
            logprobs=None,
            finished=self.finished[index],
            prompt_index=self.prompt_index[index],
            lengths=self.lengths[index],
            n=1,
            pad_id=self.pad_id,
            temperature=self.temperature,
            top_p=self.top_p,
        )

    @property
    def num_prompts(self) -> int:
        return len(self) // self.n if self.n else 0

    def responses(self) -> list[list[int]]:
        """Each row's response tokens, unpadded (stop token included when emitted)."""
        return [
            row[:length]
            for row, length in zip(self.response_ids.tolist(), self.lengths.tolist(), strict=True)
        ]

    def texts(self, tokenizer: Any, skip_special_tokens: bool = True) -> list[str]:
        """Decoded responses, one per row (special tokens such as ``<|im_end|>`` dropped by default)."""
        # batch_decode([]) returns [""] in transformers 5: an empty batch must give an empty list.
        responses = self.responses()
        return tokenizer.batch_decode(responses, skip_special_tokens=skip_special_tokens) if responses else []

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        """View a per-row tensor (B, ...) as (num_prompts, n, ...): GRPO baselines, best/worst for online DPO."""
        return x.view(self.num_prompts, self.n, *x.shape[1:])

    def to(self, device: torch.device | str) -> RolloutBatch:
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)

    def sequences(self, pad_id: int | None = None, left_pad: bool = True) -> Sequences:
        """Prompt + response as one padded batch, for the policy/reference/value/reward forward passes.

        ``left_pad=True`` (the generation layout): prompts left-padded to the longest prompt P, responses
        right-padded to R, so T = P + R and every row's response starts at column P: ``logits[:, P-1 : P+R-1]``
        lines up with ``response_ids``, ``response_mask`` and ``logprobs`` without a gather. Rows have padding
        on both sides: pass ``position_ids_from_mask(attention_mask)`` to the model.
        ``left_pad=False``: each row is prompt + response from column 0, right-padded to the longest total;
        ``response_start`` is the prompt length; positions 0.. are right without ``position_ids``.
        Tokens after a response's end (its padding) are ``pad_id`` (default ``self.pad_id``) with mask 0.
        """
        pad = self.pad_id if pad_id is None else pad_id
        device = self.response_ids.device
        responses = self.response_ids.masked_fill(self.response_mask == 0, pad)
        n_rows, r = responses.shape
        plen = torch.tensor([len(p) for p in self.prompt_ids], dtype=torch.long, device=device)
        if left_pad:
            prompts, prompt_mask = left_padded(self.prompt_ids, pad, device)
            width = prompts.shape[1]
            input_ids = torch.cat([prompts, responses], dim=1)
            attention_mask = torch.cat([prompt_mask, self.response_mask.long()], dim=1)
            return Sequences(
                input_ids, attention_mask, torch.full((n_rows,), width, dtype=torch.long, device=device)
            )
        total = plen + self.lengths.to(device)
        width = int(total.max()) if n_rows else 0
        input_ids = torch.full((n_rows, width), pad, dtype=torch.long, device=device)
        for i, ids in enumerate(self.prompt_ids):
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            length = min(int(self.lengths[i]), r)
            input_ids[i, len(ids) : len(ids) + length] = responses[i, :length]
        attention_mask = (torch.arange(width, device=device)[None, :] < total[:, None]).long()
        return Sequences(input_ids, attention_mask, plen)


def teacher_forced_logprobs(
    model: Any,
    batch: RolloutBatch,
    temperature: float | None = None,
    batch_size: int = 8,
) -> torch.Tensor:
    """Log-probs (B, R) of ``batch``'s responses under ``model``, teacher-forced, 0 on padding.

    ``log_softmax(logits / temperature)[token]`` with ``temperature`` defaulting to the batch's (1 when it
    was greedy). One forward pass per chunk of ``batch_size`` rows in the ``sequences(left_pad=True)`` layout,
    trimmed to the chunk's longest prompt and response; only the R + 1 last positions go through the LM
    head (``logits_to_keep``), so memory is ``batch_size x R x V`` floats. Runs under the caller's grad mode
    and model mode: this is also how a training step, or the reference model, scores a rollout.
    """
    temp = batch.temperature if temperature is None else temperature
    temp = temp if temp > 0 else 1.0
    n_rows, r = batch.response_ids.shape
    device = _device_of(model)
    out = torch.zeros((n_rows, r), dtype=torch.float32, device=device)
    # Similar lengths share a chunk: less padding to run through the model.
    order = sorted(range(n_rows), key=lambda i: (len(batch.prompt_ids[i]), int(batch.lengths[i])))
    for start in range(0, n_rows, batch_size):
        idx = order[start : start + batch_size]
        sub_r = max(int(batch.lengths[i]) for i in idx)
        if sub_r == 0:
            continue
        sub = batch.select(idx)
        seq = sub.sequences(left_pad=True)
        input_ids, attention_mask = seq.input_ids.to(device), seq.attention_mask.to(device)
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
            logits_to_keep=sub_r + 1,
        ).logits[:, :-1]
        tokens = input_ids[:, -sub_r:]
        logp = (logits.float() / temp).log_softmax(dim=-1).gather(-1, tokens[..., None])[..., 0]
        out[torch.tensor(idx, device=device), :sub_r] = logp * attention_mask[:, -sub_r:]
    return out


# --------------------------------------------------------------------------------------------------------
# Engines
# --------------------------------------------------------------------------------------------------------


@runtime_checkable
class RolloutEngine(Protocol):
    """What PPO, GRPO and online DPO need from a generator; nothing more, so backends can be swapped."""

    def generate(
        self,
        prompts: list[list[int]],
        n: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop: list[int] | None = None,
        seed: int | None = None,
    ) -> RolloutBatch:
        """``n`` responses per prompt (token id lists rendered by ``chatml.encode_prompt``), grouped.

        ``temperature == 0`` is greedy; ``stop=None`` means the engine's default stop tokens (``<|im_end|>``
        and the tokenizer's eos), ``stop=[]`` runs every row to ``max_new_tokens``; ``seed`` makes the
        sampling reproducible without touching the global RNG.
        """
        ...


def stop_token_ids(tokenizer: Any) -> list[int]:
    """``<|im_end|>`` first, then the tokenizer's eos if it differs (a base model may end with that)."""
    _, im_end = chatml.chatml_token_ids(tokenizer)
    stops = [im_end]
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int) and eos not in stops:
        stops.append(eos)
    return stops


def _device_of(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # a parameter-less stub
        return torch.device("cpu")


def fsdp_sharded(model: Any) -> bool:
    """Whether `model` holds FSDP2 units (`align.train.sharding`): such a model decodes under no_grad, not
    inference_mode (FSDP2 reuses the storage of its gathered weights for training, and its unshard path
    cannot run on inference tensors), and only with its whole weights gathered (`full_weights`)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules()) if hasattr(model, "modules") else False


def _check_whole_weights(model: Any) -> None:
    """Refuse to decode from weights that are still shards: each rank stops on its own rows, so the
    per-forward all-gathers would wait forever for a rank that has stopped."""
    if any(type(p).__name__ == "DTensor" for p in model.parameters()):
        raise RuntimeError(
            "rollout from a sharded model: call the engine inside align.train.sharding.full_weights(model), "
            "which gathers the whole weights once for the rollout (or build it with lockstep=True: "
            "rollout_sharded=lockstep)"
        )


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed the global RNG inside the block and restore the caller's state after it.

    A training loop's dropout and data streams must not depend on whether or how often we sampled.
    """
    if seed is None:
        yield
        return
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else []
    )
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _check_args(
    prompts: Sequence[Sequence[int]], n: int, max_new_tokens: int, temperature: float, top_p: float
) -> None:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")


class _BatchedEngine:
    """Shared machinery: repeat prompts ``n`` times, chunk by length, left-pad, cut at the stop, assemble.

    Subclasses implement ``_decode`` for one left-padded chunk.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int = 64,
        logprobs: LogprobSource = "forward",
        logprob_batch_size: int = 8,
        stop: list[int] | None = None,
        pad_id: int | None = None,
        show_progress: bool = False,
        lockstep: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if logprobs not in ("forward", "generate", "none"):
            raise ValueError(f"logprobs must be 'forward', 'generate' or 'none', got {logprobs!r}")
        if lockstep and logprobs == "forward":
            raise ValueError(
                "lockstep decoding with logprobs='forward': the teacher-forced pass count follows each rank's "
                "own row count, so sharded ranks would wait for each other; use logprobs='none' or 'generate'"
            )
        # Decode a sharded model in step with the other ranks (`align.rollout.lockstep`); the engines that
        # cannot refuse it in their constructor.
        self.lockstep = lockstep
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.logprobs: LogprobSource = logprobs
        self.logprob_batch_size = logprob_batch_size
        self.stop = list(stop) if stop is not None else stop_token_ids(tokenizer)
        if pad_id is None:
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop[0]
        self.pad_id = int(pad_id)
        self.show_progress = show_progress

    @contextlib.contextmanager
    def _rng(self, seed: int | None, device: torch.device) -> Iterator[torch.Generator | None]:
        with seeded(seed, device):
            yield None

    def _decode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        stop: list[int],
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """New tokens (b, r) for a left-padded chunk (b, W), r <= max_new_tokens, and with
        ``self.logprobs == "generate"`` their log-probs (b, r) from the decoding logits. Anything after a
        row's first stop token is ignored by the caller."""
        raise NotImplementedError

    def _idle_chunk(self, max_new_tokens: int) -> None:
        """Lockstep: the forwards of a chunk this rank does not have, in step with the ranks that do."""
        raise NotImplementedError

    def _decode_rows(
        self,
        rows: list[list[int]],
        order: list[int],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        stop: list[int],
        generator: Any,
        done: Any,
    ) -> None:
        """Decode every row (taken in ``order``), calling ``done(i, new_tokens, new_logps_or_None)`` once per
        row. Here: chunks of ``batch_size`` rows, left-padded, each through :meth:`_decode`. In lockstep every
        rank runs as many chunks as the rank with the most, idle ones (:meth:`_idle_chunk`) after its own."""
        device = _device_of(self.model)
        chunks = [order[start : start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        if self.lockstep:
            for _ in range(world_max(len(chunks), device) - len(chunks)):
                chunks.append([])
        for idx in chunks:
            if not idx:
                self._idle_chunk(max_new_tokens)
                continue
            # Left padding: every prompt ends where generation starts.
            input_ids, attention_mask = left_padded([rows[i] for i in idx], self.pad_id, device)
            new, new_logps = self._decode(
                input_ids,
                attention_mask,
                max_new_tokens,
                temperature,
                top_p,
                stop,
                generator,
            )
            new_list = new.tolist()
            lp_list = new_logps.tolist() if new_logps is not None else None
            for j, i in enumerate(idx):
                done(i, new_list[j], lp_list[j] if lp_list is not None else None)

    def generate(
        self,
        prompts: list[list[int]],
        n: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop: list[int] | None = None,
        seed: int | None = None,
    ) -> RolloutBatch:
        """See :class:`RolloutEngine`. Log-probs as chosen by the engine's ``logprobs`` setting."""
        _check_args(prompts, n, max_new_tokens, temperature, top_p)
        stops = self.stop if stop is None else list(stop)
        device = _device_of(self.model)
        rows = [list(p) for p in prompts for _ in range(n)]
        # Longest first: the largest chunk is met at once (memory), and similar lengths share a chunk.
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        responses: list[list[int] | None] = [None] * len(rows)
        logps: list[list[float] | None] = [None] * len(rows)
        finished = [False] * len(rows)
        stop_set = set(stops)

        bar = None
        if self.show_progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(rows), desc="generate", unit="seq", leave=False)
        t0, n_new = time.perf_counter(), 0

        def done(i: int, new: list[int], new_logps: list[float] | None) -> None:
            """Row ``i`` decoded ``new`` (anything after its first stop token is dropped here)."""
            nonlocal n_new
            # Finished rows are filled with pad (== eos for SmolLM2): cut at the first stop.
            cut = next((k for k, t in enumerate(new) if t in stop_set), None)
            end = len(new) if cut is None else cut + 1
            responses[i] = new[:end]
            finished[i] = cut is not None
            if new_logps is not None:
                logps[i] = new_logps[:end]
            if bar is not None:
                n_new += end
                bar.update(1)
                bar.set_postfix(tok_s=f"{n_new / max(time.perf_counter() - t0, 1e-9):.0f}")

        sharded = fsdp_sharded(self.model)
        if sharded and not self.lockstep:
            _check_whole_weights(self.model)
        was_training = self.model.training
        self.model.eval()  # no dropout while sampling: the log-probs are those of the eval-mode model
        try:
            grad_mode = torch.no_grad() if sharded else torch.inference_mode()
            with self._rng(seed, device) as generator, grad_mode:
                self._decode_rows(rows, order, max_new_tokens, temperature, top_p, stops, generator, done)
            batch = self._assemble(rows, responses, logps, finished, n, temperature, top_p, device)
            if self.logprobs == "forward" and len(batch):
                # no_grad, not inference_mode: the result is used in the loss (old log-probs), and inference
                # tensors cannot be saved for backward.
                with torch.no_grad():
                    batch.logprobs = teacher_forced_logprobs(
                        self.model, batch, batch_size=self.logprob_batch_size
                    )
        finally:
            if bar is not None:
                bar.close()
            self.model.train(was_training)
        return batch

    def _assemble(
        self,
        rows: list[list[int]],
        responses: list[list[int] | None],
        logps: list[list[float] | None],
        finished: list[bool],
        n: int,
        temperature: float,
        top_p: float,
        device: torch.device,
    ) -> RolloutBatch:
        lengths = [len(r or []) for r in responses]
        width = max(lengths, default=0)
        response_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        response_mask = torch.zeros((len(rows), width), dtype=torch.long)
        logprobs = torch.zeros((len(rows), width), dtype=torch.float32)
        for i, resp in enumerate(responses):
            if resp:
                response_ids[i, : len(resp)] = torch.tensor(resp, dtype=torch.long)
                response_mask[i, : len(resp)] = 1
                if logps[i] is not None:
                    logprobs[i, : len(resp)] = torch.tensor(logps[i], dtype=torch.float32)
        return RolloutBatch(
            prompt_ids=rows,
            response_ids=response_ids.to(device),
            response_mask=response_mask.to(device),
            logprobs=logprobs.to(device) if self.logprobs == "generate" else None,
            finished=torch.tensor(finished, dtype=torch.bool, device=device),
            prompt_index=torch.arange(len(rows), device=device) // n,
            lengths=torch.tensor(lengths, dtype=torch.long, device=device),
            n=n,
            pad_id=self.pad_id,
            temperature=float(temperature),
            top_p=float(top_p),
        )


class HFRolloutEngine(_BatchedEngine):
    """Rollouts with transformers' ``model.generate`` (left padding, KV cache).

    ``batch_size``: rows per ``generate`` call (prompts x ``n``). ``logprobs``: ``"forward"`` (default; one
    teacher-forced pass after decoding, chunked by ``logprob_batch_size`` rows), ``"generate"`` (from the
    decoding logits via ``output_logits``; no extra pass, but B x R x V floats held until the end) or
    ``"none"``. ``stop``: default stop tokens (``<|im_end|>`` + eos); ``pad_id``: default the tokenizer's pad,
    else the first stop token.
    """

    def _decode(self, input_ids, attention_mask, max_new_tokens, temperature, top_p, stop, generator):
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            # None (not []) disables stopping; an explicit None also overrides the checkpoint's eos.
            "eos_token_id": list(stop) if stop else None,
            "pad_token_id": self.pad_id,
            "use_cache": True,
            # Explicit, so a checkpoint's generation_config (Qwen2-Instruct ships top_k 20, top_p 0.8,
            # repetition_penalty 1.05) cannot change what is sampled.
            "repetition_penalty": 1.0,
        }
        if self.lockstep or fsdp_sharded(self.model):
            # transformers would decode an FSDP model in lockstep across ranks (an all-reduce per token, and
            # a finished rank keeps running forwards): what lockstep asks for. Otherwise the whole weights
            # are gathered here (`full_weights`), so each rank stops on its own rows.
            kwargs["synced_gpus"] = self.lockstep and distributed()
        if temperature > 0:
            kwargs.update(
                do_sample=True, temperature=temperature, top_p=top_p, top_k=0, min_p=None, typical_p=1.0
            )
        else:
            kwargs.update(do_sample=False)
        want_logits = self.logprobs == "generate"
        if want_logits:
            kwargs.update(return_dict_in_generate=True, output_logits=True)
        out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        sequences = out.sequences if want_logits else out
        new = sequences[:, input_ids.shape[1] :]
        if not want_logits:
            return new, None
        # out.logits are the raw logits (before temperature/top-p), one (b, V) tensor per step.
        temp = temperature if temperature > 0 else 1.0
        logits = torch.stack(out.logits, dim=1).float() / temp
        return new, logits.log_softmax(dim=-1).gather(-1, new[..., None])[..., 0]

    def _idle_chunk(self, max_new_tokens: int) -> None:
        # One token of one padding row: under synced_gpus this rank then keeps running transformers' loop
        # (an all-reduce and a forward per step) until every rank's chunk has finished.
        ids = torch.full((1, 1), self.pad_id, dtype=torch.long, device=_device_of(self.model))
        self.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
            eos_token_id=None, pad_token_id=self.pad_id, use_cache=True, synced_gpus=distributed(),
        )  # fmt: skip
