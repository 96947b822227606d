"""Everything about a policy against its baseline: win rates, KL, response length, alignment tax.

    python eval/policy.py --policy outputs/ppo/final --baseline outputs/sft/final \
        --reward-model outputs/rm/rm/final --out outputs/ppo/eval

Writes ``eval.json`` and ``eval.md`` into ``--out`` (see ``align.evaluation.policy.compare_policies``): win
rates judged by the reward model and the gold verifier with 95% Wilson intervals, gold accuracy with the
paired test (exact McNemar), mean RM score, KL(policy || baseline) on the policy's own samples, response
length, and the alignment tax (held-out LM loss and perplexity, task accuracy) before and after. Beside
them, ``per_task.jsonl``: one line per held-out task (``prompt``, ``answer``, ``baseline``, ``policy``,
``baseline_correct``, ``policy_correct``, ...), from which the paired test can be recomputed. Model paths
in the JSON are relative to the repository (or to ``--out`` for models outside it), never absolute.
Exit status: 0, or 2 for unusable input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from align.assets import AssetError
from align.data import DataError
from align.evaluation.policy import add_cli_args, check_cli_args, compare_policies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eval/policy.py", description=__doc__.split("\n\n")[0])
    add_cli_args(parser)
    parser.add_argument(
        "--tax-text", default="embedded", help="held-out text: embedded, a JSONL of {text} or a .txt"
    )
    parser.add_argument("--tax-max-rows", type=int, default=64, help="rows of 64 tokens of held-out text")
    parser.add_argument("--cache-dir", default=None, help="cache the baseline's side here (sweeps)")
    args = parser.parse_args(argv)
    problem = check_cli_args(args)
    if problem is None and args.tax_text != "embedded" and not Path(args.tax_text).is_file():
        problem = f"--tax-text {args.tax_text}: no such file"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        result = compare_policies(
            args.policy,
            args.baseline,
            reward_model=None if args.no_reward_model else args.reward_model,
            out_dir=args.out,
            num_prompts=args.num_prompts,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            seed=args.seed,
            tax_text=args.tax_text,
            tax_max_rows=args.tax_max_rows,
            device=args.device,
            prompts_file=args.prompts,
            cache_dir=args.cache_dir,
        )
    except (AssetError, DataError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(Path(args.out, "eval.md").read_text())
    print(f"per-task records: {Path(args.out, 'per_task.jsonl')}")
    headline = {
        k: result[k] for k in ("win_rate_rm", "win_rate_gold", "gold_accuracy", "kl_to_baseline", "tax")
    }
    print(json.dumps(headline, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
