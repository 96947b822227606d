"""PPO side by side: one iteration of align's `run_ppo` vs TRL 1.12's experimental PPOTrainer.

    python bench/ppo.py --mode real --model qwen2.5-0.5b --device cuda
    python bench/ppo.py --mode smoke --device cpu

The anchor setting (real): 64 responses per iteration (align: 32 queries x 2 samples, as Qwen; TRL:
64 queries x 1), prompts of 128 tokens, responses of up to 128 tokens, 4 PPO epochs, one mini-batch,
temperature 1, no nucleus cut (TRL 1.12's PPOTrainer samples with top-p 1.0, so ours does too), four
models of the same shape (policy, reference, reward, value; random init). Each side runs two
iterations; the second is timed (the first warms up). Reports seconds per iteration, response
tokens/s and peak memory.

TRL 1.16 (installed) has no PPO; 1.12 is the last with it. The peer runs in a subprocess from a
separate install, so the installed TRL is untouched. Make it once with

    pip install --no-deps --target ~/.cache/align-bench/trl-1.12.0 trl==1.12.0

(or pass --trl112 DIR); without it the peer is reported as not run, with this reason.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import common  # noqa: E402

SETTINGS = {
    "smoke": dict(responses=4, samples=2, prompt_len=12, new_tokens=6, ppo_epochs=2, micro=4),
    "real": dict(responses=64, samples=2, prompt_len=128, new_tokens=128, ppo_epochs=4, micro=16),
}
TRL112 = Path.home() / ".cache" / "align-bench" / "trl-1.12.0"
INSTALL = f"pip install --no-deps --target {TRL112} trl==1.12.0"


def _extra(p) -> None:
    p.add_argument("--trl112", default=str(TRL112), help="directory holding a TRL 1.12.0 install")
    p.add_argument("--peer-only", default=None, help="internal: run only TRL 1.12's side, JSON to this path")
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="both sides within N seconds (default: 180 real, none smoke); the peer's process gets what is left",
    )
    p.add_argument(
        "--rollout-engine", default="static", help="our rollout_engine (static: CUDA graphs on CUDA)"
    )


def shape_config(shape: str) -> dict:
    """The model shape; smoke keeps the tiny layers but Qwen's vocabulary (ours uses its tokenizer)."""
    return {**common.MODELS[shape], "vocab_size": common.MODELS["qwen2.5-0.5b"]["vocab_size"]}


def prompt_lengths(mode: str, seed: int) -> list[int]:
    s = SETTINGS[mode]
    n = s["responses"] // s["samples"]
    return common.lengths(n, s["prompt_len"], s["prompt_len"] // 2, s["prompt_len"] * 2, seed)


def run_ours(args, work: Path) -> dict:
    """Write a policy (with the Qwen tokenizer), a reward model and prompts, then run_ppo for two steps."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import chatml
    from align.config import PPOConfig
    from align.reward import RewardModel
    from align.tasks import write_jsonl
    from align.tracking import read_metrics
    from align.train.ppo import run_ppo

    s = SETTINGS[args.mode]
    tokenizer = chatml.qwen_tokenizer()
    torch.manual_seed(args.seed)
    config = Qwen2Config(
        **shape_config(args.shape),
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    policy_dir = work / "policy"
    Qwen2ForCausalLM(config).save_pretrained(policy_dir, safe_serialization=True)
    tokenizer.save_pretrained(policy_dir)
    _, im_end = chatml.chatml_token_ids(tokenizer)
    rm_dir = RewardModel.from_backbone(policy_dir, end_token_id=im_end, seed=args.seed).save_pretrained(
        work / "rm", tokenizer
    )
    # Qwen's tokenizer splits digits one by one: n digits are n tokens, plus the template's own.
    overhead = len(chatml.encode_prompt([{"role": "user", "content": "1"}], tokenizer)) - 1
    rng = random.Random(args.seed)
    lens = [max(1, n - overhead) for n in prompt_lengths(args.mode, args.seed)]
    prompts = [
        {"messages": [{"role": "user", "content": "".join(rng.choice("0123456789") for _ in range(n))}]}
        for n in lens
    ]
    prompts_path = write_jsonl(work / "prompts.jsonl", prompts)
    queries = len(prompts)
    cfg = PPOConfig(
        model_name_or_path=str(policy_dir),
        reward_model_path=str(rm_dir),
        dataset=str(prompts_path),
        output_dir=str(work / "out"),
        max_length=4 * s["prompt_len"],
        batch_size=queries,
        micro_batch_size=s["micro"],
        samples_per_query=s["samples"],
        max_new_tokens=s["new_tokens"],
        max_steps=2,
        value_warmup_steps=0,
        ppo_epochs=s["ppo_epochs"],
        num_mini_batches=1,
        temperature=1.0,
        top_p=1.0,
        ptx_coef=0.0,
        save_steps=0,
        save_total_limit=1,
        report_to=["none"],
        progress=False,
        train_missing_stages=False,
        log_rollouts=0,
        rollout_engine=args.rollout_engine,
        attn_implementation="auto",
    )
    result: dict = {"name": f"align run_ppo (rollout_engine={args.rollout_engine}, chunked log-probs)"}
    with common.peak_memory(args.device, result):  # loading the four models included
        run_ppo(cfg)
    last = read_metrics(cfg.output_dir)[-1]
    seconds = last["time_rollout"] + last["time_scoring"] + last["time_training"]
    tokens = last["response_length"] * queries * s["samples"]
    result.update(
        {
            "seconds_per_iteration": round(seconds, 4),
            "time_rollout": round(last["time_rollout"], 4),
            "time_scoring": round(last["time_scoring"], 4),
            "time_training": round(last["time_training"], 4),
            "responses": queries * s["samples"],
            "response_tokens": round(tokens),
            "response_tokens_per_s": round(tokens / seconds, 2),
            "prompt_tokens_mean": round(sum(lens) / len(lens) + overhead, 1),
        }
    )
    return result


def run_peer_subprocess(args, seconds_left: float | None = None) -> tuple[dict | None, str]:
    """TRL 1.12's side in a fresh interpreter with the 1.12 install first on the path, cut off after
    ``seconds_left`` (None: no limit)."""
    target = Path(args.trl112)
    if not (target / "trl" / "experimental" / "ppo").is_dir():
        return None, f"TRL 1.12.0 not found in {target}; install it with: {INSTALL}"
    if seconds_left is not None and seconds_left < 30:
        return None, f"not run: {seconds_left:.0f} s of the budget left after our side"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peer.json"
        cmd = [sys.executable, __file__, "--mode", args.mode, "--device", args.device, "--model", args.model]
        cmd += ["--seed", str(args.seed), "--peer-only", str(out)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}
        env["TRL_EXPERIMENTAL_SILENCE"] = "1"
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds_left)
        except subprocess.TimeoutExpired:
            return None, f"TRL 1.12 peer did not finish within the {seconds_left:.0f} s left of the budget"
        if proc.returncode != 0 or not out.exists():
            return None, "TRL 1.12 peer failed: " + proc.stderr.strip().splitlines()[-1][:300]
        return json.loads(out.read_text()), ""


def run_trl112(args) -> dict:
    """One process, TRL 1.12 on the path: two PPOTrainer iterations, the second timed."""
    import trl
    from datasets import Dataset
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    s = SETTINGS[args.mode]
    vocab = shape_config(args.shape)["vocab_size"]
    tokenizer = common.synthetic_tokenizer(vocab)
    rng = random.Random(args.seed)
    # Same prompt lengths as ours (template included); one sample per query, so twice the queries.
    lens = [n for n in prompt_lengths(args.mode, args.seed) for _ in range(s["samples"])]
    data = Dataset.from_list([{"input_ids": common.random_ids(n, vocab, rng)} for n in lens])

    def config(labels: int | None = None):
        c = Qwen2Config(**shape_config(args.shape), bos_token_id=None, eos_token_id=0, pad_token_id=0)
        c._attn_implementation = common.attn_implementation(args.device, side="peer")
        if labels:
            c.num_labels = labels
        return c

    ticks: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *_, **__):
            common.sync(args.device)
            ticks.append(time.perf_counter())

        def on_step_end(self, *_, **__):
            common.sync(args.device)
            ticks.append(time.perf_counter())

    n = len(lens)
    cfg = PPOConfig(
        output_dir=str(Path(tempfile.mkdtemp()) / "trl-ppo"),
        per_device_train_batch_size=n,
        local_rollout_forward_batch_size=s["micro"],
        gradient_accumulation_steps=1,
        num_mini_batches=1,
        num_ppo_epochs=s["ppo_epochs"],
        total_episodes=2 * n,
        response_length=s["new_tokens"],
        temperature=1.0,
        num_sample_generations=0,
        stop_token="eos",
        **{k: v for k, v in common.peer_args(args.device).items() if k not in ("max_grad_norm",)},
    )
    result: dict = {"name": f"TRL {trl.__version__} experimental PPOTrainer"}
    # Building the four models is inside the measured block, as loading them is on our side.
    with common.peak_memory(args.device, result):
        torch.manual_seed(args.seed)
        policy, ref = Qwen2ForCausalLM(config()), Qwen2ForCausalLM(config())
        reward, value = Qwen2ForSequenceClassification(config(1)), Qwen2ForSequenceClassification(config(1))
        trainer = PPOTrainer(
            args=cfg,
            processing_class=tokenizer,
            model=policy,
            ref_model=ref,
            reward_model=reward,
            value_model=value,
            train_dataset=data,
            callbacks=[Clock()],
        )
        trainer.train()
    seconds = ticks[-1] - ticks[-2]
    tokens = n * s["new_tokens"]  # TRL generates the full response_length for every query
    result.update(
        {
            "seconds_per_iteration": round(seconds, 4),
            "responses": n,
            "response_tokens": tokens,
            "response_tokens_per_s": round(tokens / seconds, 2),
            "iterations": len(ticks) - 1,
        }
    )
    return result


def main(argv: list[str] | None = None) -> dict | None:
    args = common.stage_args("ppo", __doc__, argv, extra=_extra)
    if args.peer_only:
        Path(args.peer_only).write_text(json.dumps(run_trl112(args)))
        return None
    budget = args.budget_s if args.budget_s is not None else (180.0 if args.mode == "real" else None)
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        ours = run_ours(args, Path(tmp))
    common.release_memory(args.device)
    ours["wall_s_with_loading"] = round(time.monotonic() - start, 1)
    left = None if budget is None else budget - (time.monotonic() - start)
    peer, why = run_peer_subprocess(args, left)
    setting = {
        **SETTINGS[args.mode],
        "queries_ours": SETTINGS[args.mode]["responses"] // SETTINGS[args.mode]["samples"],
        "budget_s": budget,
        "rollout_engine": args.rollout_engine,
    }
    return common.compare(
        args, "seconds_per_iteration", ours, peer, setting, higher_is_better=False, note=why
    )


if __name__ == "__main__":
    main()
