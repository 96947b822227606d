"""Rejection-sampled preference pairs (Qwen2): sample n responses per prompt from a policy, label them with a
verifier, your own checker or a reward model, and write correct-vs-incorrect pairs for recipes/rm.py and
recipes/dpo.py.

    python recipes/sample_pairs.py --config recipes/configs/sample_pairs/embedded.yaml [key=value ...]
    python recipes/sample_pairs.py model_name_or_path=outputs/sft/final dataset=math.jsonl \
        reward=checker checker=my_checks:is_correct output_dir=outputs/math_pairs

A checker is a Python function imported by name (`module:function`, from sys.path or the current
directory), called as fn(record, response) -> bool | float, with `record` the prompt file's JSON object.
Writes pairs.jsonl ({prompt, chosen, rejected, group, source, ...}), samples.jsonl, report.json and
report.md into output_dir (see align/pipeline/sample_pairs.py). `--help` lists every key.
"""

import sys

from align.pipeline.sample_pairs import SamplePairsConfig, run_sample_pairs
from align.train.recipe import run_recipe

if __name__ == "__main__":
    sys.exit(run_recipe(SamplePairsConfig, run_sample_pairs, prog="recipes/sample_pairs.py"))
