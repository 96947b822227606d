"""Optional vLLM backend behind the :class:`~align.rollout.RolloutEngine` interface (``rollout_engine: vllm``).

Needs ``pip install vllm`` (CUDA only); without it the constructor raises an ``ImportError`` that says so.
**Not tested in this repository** (no GPU, no vLLM in CI): only the missing-vLLM error is.

Weight sync: vLLM keeps its own copy of the weights, colocated on the same GPU as the training policy (TRL's
"colocate" mode). The training loops keep calling ``engine.generate`` on the engine built around the
policy; with ``sync="every_call"`` (default) each call first copies the policy's current ``state_dict``
into vLLM's model (``load_weights``, the path TRL uses; a GPU-to-GPU copy, ~1 GB for Qwen2.5-0.5B in
bf16), so rollouts always come from the policy being trained. ``sync="manual"``: call
:meth:`VLLMRolloutEngine.sync_weights` yourself (e.g. after each optimiser step when generating more often
than updating). The vLLM side is built once from ``model_path`` (default: the policy's
``config._name_or_path``), ``dtype`` bf16, sharing the GPU (``gpu_memory_utilization``, default 0.3).

Sampling: ``temperature``/``top_p`` as in the other engines, no top-k, one request per row seeded with
``seed + row index`` (reproducible and independent of batching, like :class:`~align.rollout.static.
StaticRolloutEngine`, though vLLM's random stream is its own). Stop tokens are passed as
``stop_token_ids`` with the model's own eos ignored. Log-probs: ``"forward"`` (default: the teacher-forced
pass through the policy, so PPO's first ratio is 1 whatever kernels vLLM decoded with) or ``"none"``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

import torch

from align.rollout.batch import _BatchedEngine
from align.rollout.lockstep import refuse_lockstep

INSTALL_HINT = (
    "VLLMRolloutEngine needs vLLM, which is not installed: pip install vllm (CUDA only), "
    "or set rollout_engine to static, manual or hf"
)


class VLLMRolloutEngine(_BatchedEngine):
    """Rollouts with vLLM, weights synced from the training policy (see the module docstring)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        model_path: str | None = None,
        gpu_memory_utilization: float = 0.3,
        sync: Literal["every_call", "manual"] = "every_call",
        **kwargs: Any,
    ) -> None:
        if kwargs.get("lockstep"):
            refuse_lockstep("vllm", "vLLM decodes its own whole copy of the weights, not the sharded model")
        try:
            import vllm
        except ImportError as e:
            raise ImportError(INSTALL_HINT) from e
        super().__init__(model, tokenizer, **kwargs)
        if self.logprobs == "generate":
            raise ValueError("VLLMRolloutEngine supports logprobs='forward' or 'none'")
        if sync not in ("every_call", "manual"):
            raise ValueError(f"sync must be 'every_call' or 'manual', got {sync!r}")
        self.sync = sync
        self._vllm = vllm
        self.llm = vllm.LLM(
            model=model_path or model.config._name_or_path,
            dtype="bfloat16",
            gpu_memory_utilization=gpu_memory_utilization,
            enable_prefix_caching=True,  # the n samples of a prompt share its prefill
        )

    @torch.no_grad()
    def sync_weights(self) -> None:
        """Copy the policy's current weights into vLLM's model (the colocated path TRL uses)."""
        executor = self.llm.llm_engine.model_executor
        executor.driver_worker.worker.model_runner.model.load_weights(self.model.state_dict().items())
        self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights

    def _rng(self, seed, device):  # vLLM seeds each request itself: pass the integer through
        return contextlib.nullcontext(seed)

    def _decode_rows(self, rows, order, max_new_tokens, temperature, top_p, stop, generator, done) -> None:
        if not order:
            return
        if self.sync == "every_call":
            self.sync_weights()
        from vllm.inputs import TokensPrompt

        base = int(generator) if generator is not None else None
        params = [
            self._vllm.SamplingParams(
                n=1,
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_new_tokens,
                stop_token_ids=list(stop),
                ignore_eos=True,  # only our stop tokens end a row (stop=[] runs to max_new_tokens)
                seed=None if base is None else base + i,
                detokenize=False,
            )
            for i in order
        ]
        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=rows[i]) for i in order], params, use_tqdm=self.show_progress
        )
        stop_set = set(stop)
        for i, out in zip(order, outs, strict=True):
            tokens = list(out.outputs[0].token_ids)
            reason = out.outputs[0].stop_reason
            if isinstance(reason, int) and reason in stop_set and (not tokens or tokens[-1] != reason):
                tokens.append(reason)  # a version that strips the stop token: put it back (it is scored)
            done(i, tokens, None)
