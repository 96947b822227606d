"""Win rate of a policy against a baseline on held-out prompts, judged by a reward model and the gold verifier.

    python eval/win_rate.py --policy outputs/ppo/final --baseline outputs/sft/final \
        --reward-model outputs/rm/rm/final --out outputs/ppo/win_rate

Both models answer every prompt greedily; a pair is a win, a tie (counted half) or a loss for the policy,
and the rate comes with a 95% Wilson interval. Also reported: KL(policy || baseline) on the policy's own
samples and the mean response length. Writes ``win_rate.json`` and ``win_rate.md`` into ``--out``.
Exit status: 0, or 2 for unusable input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from align.assets import AssetError
from align.data import DataError
from align.evaluation.policy import (
    add_cli_args,
    check_cli_args,
    compare_policies,
    format_win_rate,
    write_report,
)

KEYS = ("policy", "baseline", "reward_model", "num_prompts", "win_rate_rm", "win_rate_gold", "gold_accuracy",
        "rm_score", "kl_to_baseline", "kl_to_baseline_std", "response_length", "unfinished", "seconds")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eval/win_rate.py", description=__doc__.split("\n\n")[0])
    add_cli_args(parser)
    args = parser.parse_args(argv)
    problem = check_cli_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    out = Path(args.out)
    try:
        # tax_max_rows=0: no held-out LM loss here (eval/alignment_tax.py measures it).
        r = compare_policies(
            args.policy,
            args.baseline,
            reward_model=None if args.no_reward_model else args.reward_model,
            out_dir=out / "full",
            num_prompts=args.num_prompts,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            seed=args.seed,
            tax_max_rows=0,
            device=args.device,
            prompts_file=args.prompts,
        )
    except (AssetError, DataError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = {k: r[k] for k in KEYS}
    rm = r["rm_score"]
    md = "\n".join([
        f"# Win rate: {args.policy} vs {args.baseline}",
        "",
        f"{r['num_prompts']} held-out prompts, greedy responses; ties count half; 95% Wilson intervals.",
        "",
        f"- judged by the reward model ({r['reward_model'] or '-'}): {format_win_rate(r['win_rate_rm'])}",
        f"- judged by the gold verifier: {format_win_rate(r['win_rate_gold'])}",
        f"- gold accuracy: policy {100 * r['gold_accuracy']['policy']:.1f}%, "
        f"baseline {100 * r['gold_accuracy']['baseline']:.1f}%",
        f"- mean RM score: policy {rm['policy']:.3f}, baseline {rm['baseline']:.3f}" if rm else "- mean RM score: -",
        f"- KL(policy || baseline): {r['kl_to_baseline']:.4f} nats per response (sampled at temperature 1)",
        f"- response length: policy {r['response_length']['policy']:.1f}, "
        f"baseline {r['response_length']['baseline']:.1f} tokens",
        "",
        f"Samples and the full comparison: `{out / 'full' / 'eval.md'}`.",
        "",
    ])  # fmt: skip
    write_report(out, "win_rate", result, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
