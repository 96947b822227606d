"""The run scaffolding PPO and the online loops (online DPO, GRPO) share, so each loop file holds only its
method: the output directory, seed and batch split, the encoded prompts, the rollout engine, resume, the
metrics logger and rollouts.jsonl, the step's queries and seeded rollout (in the training precision), the
end-of-step bookkeeping (metrics line, progress bar, checkpoint) and the final save and summary.json.

A loop reads:
    accelerator, out = start_rl_run(cfg, stage)          # set up
    ... the method's models, encode_rl_prompts, optimisers, accelerate's prepare ...
    run = open_rl_run(...)                                # engine, resume, logger
    for step in run.steps():
        queries = run.local_queries(step)
        batch = run.rollout(queries, step)                # rollout
        ... score, advantages, update: the method's phases ...
        if run.end_step(...):                             # log, checkpoint
            return {"stopped_at": step + 1}
    return run.finish(...)                                # final model, plot, summary.json
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

import chatml
from align.config_loader import config_to_dict
from align.data import DataError
from align.models import save_final_model
from align.rollout.batch import RolloutBatch
from align.rollout.engines import engine_class, engine_options
from align.tracking import MetricsLogger, plot_metrics
from align.train.batching import global_batch_indices
from align.train.checkpointing import RunCheckpointer, fingerprint_rows
from align.train.process import RunSetupError, make_accelerator, prepare_output_dir
from align.train.rl_common import log_rl_step, rollout_weights
from align.train.sharding import full_state_dict, is_sharded

Messages = list[dict[str, str]]


def start_rl_run(
    cfg: Any, stage: str, *, min_samples: int = 1, split_mini_batches: bool = True
) -> tuple[Accelerator, Path]:
    """The accelerator and the prepared output directory; seeds everything. Refuses, before any model is
    loaded, a batch of queries that does not split evenly over the processes (each samples its own share),
    fewer than `min_samples` samples per query (the online methods compare samples), and with
    `split_mini_batches` a rollout batch that `num_mini_batches` optimiser steps cannot share evenly."""
    accelerator = make_accelerator(cfg)
    world = accelerator.num_processes
    out = prepare_output_dir(
        cfg.output_dir, overwrite=cfg.overwrite, is_main=accelerator.is_main_process, stage=stage
    )
    accelerator.wait_for_everyone()
    set_seed(cfg.seed)
    if cfg.batch_size % world:
        raise RunSetupError(f"batch_size={cfg.batch_size} queries cannot be split over {world} processes")
    if cfg.samples_per_query < min_samples:
        raise RunSetupError(
            f"samples_per_query={cfg.samples_per_query}: {stage} compares samples, use {min_samples} or more"
        )
    rows = rows_per_process(cfg, world)
    if split_mini_batches and rows % cfg.num_mini_batches:
        raise RunSetupError(
            f"{rows} responses per process do not split into num_mini_batches={cfg.num_mini_batches}"
        )
    return accelerator, out


def rows_per_process(cfg: Any, world: int) -> int:
    """Responses each process samples per iteration: its share of the queries x samples_per_query."""
    return cfg.batch_size // world * cfg.samples_per_query


def encode_rl_prompts(
    cfg: Any, prompts: list[Messages], tokenizer: Any, default_system: str | None
) -> list[list[int]]:
    """The prompts as ChatML token ids, ending with the assistant header; refuses any over max_length
    (a rollout must not start from a truncated question)."""
    # Looked up on the module at call time, so a test's spy on chatml.encode_prompt sees every prompt.
    prompt_ids = [chatml.encode_prompt(p, tokenizer, default_system=default_system) for p in prompts]
    too_long = [i for i, ids in enumerate(prompt_ids) if len(ids) > cfg.max_length]
    if too_long:
        raise DataError(
            f"{len(too_long)} prompts exceed max_length={cfg.max_length} tokens (first: #{too_long[0]})"
        )
    return prompt_ids


def sample_rollouts(
    engine: Any,
    prompts: list[list[int]],
    *,
    n: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    autocast: Callable[[], AbstractContextManager[Any]],
    stop: list[int] | None = None,
) -> RolloutBatch:
    """The RL loops' rollout call (and what bench/generate.py times): `engine.generate` inside
    `autocast()`, the training forward's precision (`accelerator.autocast`: bf16 autocast over the fp32
    master weights on GPU, nothing on CPU). Without it a GPU rollout would decode in fp32, and the static
    engine would allocate its KV cache, and capture its CUDA graphs, in fp32 (see
    `align.rollout.static.compute_dtype`). Log-probs come back float32 either way."""
    with autocast():
        return engine.generate(
            prompts,
            n=n,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=stop,
            seed=seed,
        )


class PhaseTimer:
    """Wall-clock seconds of an iteration's phases (`with timer("rollout"): ...`), for the time_* metrics."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.seconds[phase] = time.perf_counter() - t0


@dataclasses.dataclass
class RLRun:
    """One RL run's shared state: what every iteration of PPO or an online loop reads and writes besides
    its own models. Built by `open_rl_run`."""

    cfg: Any
    stage: str  # "ppo", "online_dpo" or "grpo": the summary's stage and the progress bar's label
    accelerator: Accelerator
    out: Path
    tokenizer: Any
    prompts: list[Messages]
    tasks: list[Any] | None  # the embedded prompts' verifiable tasks (gold_score), else None
    prompt_ids: list[list[int]]
    steps_per_epoch: int
    num_steps: int
    policy: torch.nn.Module  # as prepared by accelerate
    policy_u: torch.nn.Module  # unwrapped: the engine samples from it and it is what is saved
    engine: Any
    checkpointer: RunCheckpointer
    objects: tuple[dict[str, Any], dict[str, Any], dict[str, Any]]  # modules, optimisers, schedulers
    logger: MetricsLogger
    start_step: int
    saved: dict[str, Any] | None  # the restored trainer state, None for a fresh run
    postfix: dict[str, str]  # progress-bar label -> metric shown
    order: list[int] | None = None  # a fixed query order (GRPO's variance curriculum) instead of shuffling
    bar: Any = None
    last: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rollout_log(self) -> Path:
        return self.out / "rollouts.jsonl"

    def steps(self) -> Iterator[int]:
        """The iterations still to run (0-based), with the progress bar."""
        # Made here, not at open: the bar must not appear before the set-up's own messages.
        self.bar = tqdm(
            total=self.num_steps,
            initial=self.start_step,
            desc=self.stage,
            disable=not (self.is_main and self.cfg.progress),
        )
        yield from range(self.start_step, self.num_steps)

    def local_queries(self, step: int) -> list[int]:
        """This process's share of iteration `step`'s queries (indices into `prompts`)."""
        cfg = self.cfg
        if self.order is None:
            indices = global_batch_indices(step, len(self.prompt_ids), cfg.batch_size, cfg.seed)
        else:
            k = step % self.steps_per_epoch
            indices = self.order[k * cfg.batch_size : (k + 1) * cfg.batch_size]
        per_process = cfg.batch_size // self.world
        rank = self.accelerator.process_index
        return indices[rank * per_process : (rank + 1) * per_process]

    def sample(self, queries: list[int], seed: int) -> RolloutBatch:
        """`samples_per_query` responses to each query, sampled with `seed` in the training precision
        (`sample_rollouts`), on the training device."""
        cfg = self.cfg
        # vLLM decodes its own bf16 copy of the weights with its own kernels: no autocast of ours there.
        autocast = nullcontext if cfg.rollout_engine == "vllm" else self.accelerator.autocast
        with torch.no_grad(), rollout_weights(self.engine):
            batch = sample_rollouts(
                self.engine,
                [self.prompt_ids[i] for i in queries],
                n=cfg.samples_per_query,
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                seed=seed,
                autocast=autocast,
            )
        return batch.to(self.accelerator.device)

    def rollout(self, queries: list[int], step: int) -> RolloutBatch:
        """The rollout phase: (B = len(queries) x samples_per_query) responses, seeded by (seed, step,
        process) so a resumed run samples what the uninterrupted one did."""
        return self.sample(
            queries, seed=self.cfg.seed * 100_003 + step * self.world + self.accelerator.process_index
        )

    def end_step(
        self,
        step: int,
        metrics: dict[str, Any],
        batch: RolloutBatch,
        texts: list[str],
        queries: list[int],
        scores: torch.Tensor,
        timer: PhaseTimer,
        trainer_state: Callable[[], dict[str, Any]],
        stop_after_step: int | None,
    ) -> bool:
        """Log iteration `step` (0-based; `scores` (B,) go to rollouts.jsonl), advance the bar, write a
        checkpoint of `trainer_state()` when due. True when the loop must return now (bar and logger are
        then closed)."""
        done = step + 1
        timings = (timer.seconds["rollout"], timer.seconds["scoring"], timer.seconds["training"])
        log_rl_step(
            self.cfg, metrics, done, self.num_steps, self.logger, batch, texts, scores, timings,
            tasks=self.tasks, local=queries, prompts=self.prompts, rollout_log=self.rollout_log,
            is_main=self.is_main,
        )  # fmt: skip
        self.last = metrics
        self.bar.update(1)
        self.bar.set_postfix(**{label: f"{metrics[key]:.3f}" for label, key in self.postfix.items()})

        def save(step: int) -> None:
            self.checkpointer.save(step, trainer_state(), *self.objects)

        if self.checkpointer.end_of_step(done, self.num_steps, save, stop_after_step):
            self.bar.close()
            self.logger.close()
            return True
        return False

    def last_numbers(self) -> dict[str, Any]:
        """The last iteration's numeric metrics, for the summary."""
        return {k: v for k, v in self.last.items() if isinstance(v, int | float)}

    def finish(
        self,
        fields: dict[str, Any],
        plot_keys: list[str],
        title: str,
        *,
        also_save: dict[str, torch.nn.Module] | None = None,
        before_save: Callable[[dict[str, Any]], None] | None = None,
        started: float | None = None,
    ) -> dict[str, Any]:
        """Save the final policy (and each prepared model of `also_save` into its directory), plot, write
        summary.json; return the summary: the run's paths, then `fields`, then the plot (and time_total_s
        since `started`). `before_save(summary)` runs on the main process before the policy is saved."""
        self.bar.close()
        accelerator, out = self.accelerator, self.out
        summary: dict[str, Any] = {
            "stage": self.stage,
            "output_dir": str(out),
            "final_model": str(out / "final"),
            "metrics": str(out / "metrics.jsonl"),
            **fields,
        }
        accelerator.wait_for_everyone()
        # Every process takes part in gathering the state dicts (sharded models); only the main one writes.
        policy_state = gathered_state(accelerator, self.policy)
        other_states = {name: gathered_state(accelerator, m) for name, m in (also_save or {}).items()}
        if self.is_main:
            if before_save is not None:
                before_save(summary)
            save_final_model(self.policy_u, self.tokenizer, out / "final", state_dict=policy_state)
            for name, model in (also_save or {}).items():
                accelerator.unwrap_model(model).save_pretrained(
                    out / name, self.tokenizer, state_dict=other_states[name]
                )
            summary["plot"] = str(plot_metrics(out, plot_keys, title=title))
            if started is not None:
                summary["time_total_s"] = round(time.perf_counter() - started, 2)
            (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        self.logger.close()
        accelerator.wait_for_everyone()
        return summary


def gathered_state(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole weights of a trained model for its final save, on the main process; a collective."""
    return full_state_dict(model) if is_sharded(model) else accelerator.get_state_dict(model)


def open_rl_run(
    cfg: Any,
    stage: str,
    accelerator: Accelerator,
    out: Path,
    tokenizer: Any,
    prompts: list[Messages],
    tasks: list[Any] | None,
    prompt_ids: list[list[int]],
    steps: tuple[int, int],
    policy: torch.nn.Module,
    *,
    modules: dict[str, torch.nn.Module],
    optimizers: dict[str, Any],
    schedulers: dict[str, Any],
    postfix: dict[str, str],
) -> RLRun:
    """The run after accelerate's prepare: the rollout engine over the unwrapped policy, the checkpointer
    with the latest good checkpoint restored into the policy, `modules` (unwrapped) and the optimisers and
    schedulers, the metrics logger, and a fresh rollouts.jsonl for a fresh run.
    `steps`: (steps per epoch, total steps), as `total_steps` gives them."""
    policy_u = accelerator.unwrap_model(policy)
    # The loops compute their own log-probs in the training layout, so the engine computes none.
    engine = engine_class(cfg.rollout_engine)(
        policy_u,
        tokenizer,
        batch_size=max(rows_per_process(cfg, accelerator.num_processes), 1),
        logprobs="none",
        **engine_options(cfg),
    )
    if getattr(engine, "lockstep", False):
        accelerator.print(
            f"rollouts: rollout_engine={cfg.rollout_engine} decodes the sharded policy in lockstep"
        )
    fingerprint = fingerprint_rows([{"input_ids": ids} for ids in prompt_ids], keys=("input_ids",))
    checkpointer = RunCheckpointer(accelerator, out, cfg, fingerprint, same_world=True)
    objects = ({"policy": policy_u, **modules}, optimizers, schedulers)
    start_step, saved = checkpointer.restore(*objects)
    logger = MetricsLogger(
        out,
        cfg.report_to,
        enabled=accelerator.is_main_process,
        resume_step=start_step if saved is not None else None,
        run_config=config_to_dict(cfg),
    )
    run = RLRun(
        cfg, stage, accelerator, out, tokenizer, prompts, tasks, prompt_ids, *steps, policy, policy_u, engine,
        checkpointer, objects, logger, start_step, saved, postfix,
    )  # fmt: skip
    if run.is_main and saved is None and run.rollout_log.exists():
        run.rollout_log.unlink()  # a fresh run's rollouts.jsonl starts empty; a resumed one appends
    return run
