"""The best-of-n gate: gold accuracy of best-of-n by a reward model against the mean sample and greedy.

    python eval/best_of_n.py --policy outputs/sft/final --reward-model outputs/rm/rm/final \
        --num-prompts 200 --n 8 --out outputs/best_of_n

On held-out tasks (eval/policy.py's: ``generate_tasks(split="heldout")``), samples n responses per prompt
from the policy, scores them with the reward model and verifies them. Writes ``best_of_n.json``,
``best_of_n.md``, ``best_of_n.png`` (accuracy against n) and ``samples.jsonl`` into ``--out`` (see
``align.pipeline.best_of_n``): gold accuracy and mean RM score of greedy, the mean sample and best-of-k
(k = 1, 2, 4, ..., n, from the same samples) with 95% Wilson intervals, and the gain of best-of-n over the
mean sample in points. It tells, before any PPO, whether an RM is worth optimising against; its per-kind
table says on which task kinds (best-of-n by the RM reaches greedy there), the kinds to give PPO's
``query_kinds``.

    python eval/best_of_n.py --rescore outputs/best_of_n --reward-model outputs/rm/other/final \
        --out outputs/best_of_n-other

judges an earlier gate's samples with another reward model instead of sampling again: the same prompts,
samples and gold verdicts, new scores, so two RMs are compared on identical samples in the minutes scoring
takes. Exit status: 0, or 2 for unusable input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from align.assets import AssetError
from align.data import DataError
from align.evaluation.policy import check_cli_args
from align.pipeline.best_of_n import best_of_n_eval, rescore_best_of_n

_SAMPLING = ("num_prompts", "prompts", "n", "max_new_tokens", "temperature", "top_p", "seed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eval/best_of_n.py", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--policy", help="the policy to sample from (e.g. outputs/sft/final)")
    source.add_argument(
        "--rescore", metavar="GATE_DIR", help="an earlier gate's --out: judge its samples with --reward-model"
    )
    parser.add_argument("--reward-model", required=True, help="a reward model directory (recipes/rm.py)")
    parser.add_argument("--out", required=True, metavar="DIR", help="where the reports and the plot go")
    parser.add_argument("--num-prompts", type=int, default=200, help="held-out prompts (default 200)")
    parser.add_argument(
        "--prompts", default=None, metavar="FILE", help="a tasks JSONL instead of generated ones"
    )
    parser.add_argument("--n", type=int, default=8, help="samples per prompt (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per generation / scoring batch")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out tasks and of the sampling")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    args = parser.parse_args(argv)
    problem = check_cli_args(args)  # the checks eval/policy.py makes (paths, counts), then --n
    if problem is None and args.n < 1:
        problem = "--n must be >= 1"
    if problem is None and args.rescore:  # the gate's samples are fixed: a sampling option would be ignored
        given = [f"--{o.replace('_', '-')}" for o in _SAMPLING if getattr(args, o) != parser.get_default(o)]
        if given:
            problem = f"--rescore reads the gate's samples as they are; {', '.join(given)} cannot apply"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        if args.rescore:
            result = rescore_best_of_n(
                args.rescore,
                args.reward_model,
                out_dir=args.out,
                batch_size=args.batch_size,
                device=args.device,
            )
        else:
            result = best_of_n_eval(
                args.policy,
                args.reward_model,
                out_dir=args.out,
                num_prompts=args.num_prompts,
                n=args.n,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                batch_size=args.batch_size,
                seed=args.seed,
                device=args.device,
                prompts_file=args.prompts,
            )
    except (AssetError, DataError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(Path(args.out, "best_of_n.md").read_text())
    print(json.dumps({"gain": result["gain"], "seconds": result["seconds"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
