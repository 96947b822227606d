"""Ablation sweeps: grid expansion and key validation, resume, failures, results and plots (no training:
a fake run function stands in for the recipe subprocess)."""

import csv
import json

import pytest

from align.config_loader import ConfigError
from align.pipeline.ablate import (
    Run,
    _failure,
    aggregate,
    expand_grid,
    load_sweep,
    pareto_front,
    parse_grid,
    run_sweep,
)


def write_yaml(path, text):
    path.write_text(text)
    return path


@pytest.fixture
def sweep_file(tmp_path):
    return write_yaml(
        tmp_path / "sweep.yaml",
        "recipe: ppo\nconfig: {max_steps: 3}\ngrid: {ptx_coef: [0, 2]}\neval: {num_prompts: 8}\n"
        f"out: {tmp_path / 'out'}\ncurves: [rm_score, kl]\n",
    )


def test_parse_and_expand_grid_is_a_cartesian_product_times_seeds():
    grid = parse_grid(["ptx_coef=0,0.5,2", "kl_coef=0.01,0.1"])
    assert grid == {"ptx_coef": [0, 0.5, 2], "kl_coef": [0.01, 0.1]}
    runs = expand_grid(grid, seeds=[1, 2])
    assert len(runs) == 3 * 2 * 2
    # first key slowest, seed fastest
    assert [(r.values["ptx_coef"], r.values["kl_coef"], r.seed) for r in runs[:5]] == [
        (0, 0.01, 1), (0, 0.01, 2), (0, 0.1, 1), (0, 0.1, 2), (0.5, 0.01, 1),
    ]  # fmt: skip
    assert len({r.name for r in runs}) == 12
    assert runs[0].name == "ptx_coef-0_kl_coef-0.01_seed-1"
    assert runs[0].setting == "ptx_coef=0 kl_coef=0.01"
    with pytest.raises(ConfigError, match="key=v1"):
        parse_grid(["ptx_coef"])


def test_load_sweep_validates_keys_before_any_run(sweep_file, tmp_path):
    sweep = load_sweep(sweep_file, grid=parse_grid(["kl_coef=0.01,0.1"]), seeds=2)
    assert sweep.grid == {"ptx_coef": [0, 2], "kl_coef": [0.01, 0.1]}  # the command line adds/replaces keys
    assert sweep.seeds == [42, 43]  # PPOConfig's default seed, then the next
    with pytest.raises(
        ConfigError, match=r"unknown key 'ptx_cof' for PPOConfig \(did you mean 'ptx_coef'\?\)"
    ):
        load_sweep(sweep_file, grid=parse_grid(["ptx_cof=0,1"]))
    with pytest.raises(ConfigError, match="kl_coef: expected a number"):
        load_sweep(sweep_file, grid=parse_grid(["kl_coef=0.1,high"]))
    bad = write_yaml(tmp_path / "bad.yaml", "recipe: ppo\nconfig: {max_stepz: 3}\n")
    with pytest.raises(ConfigError, match="max_stepz"):
        load_sweep(bad)
    with pytest.raises(ConfigError, match="recipe must be one of"):
        load_sweep(write_yaml(tmp_path / "r.yaml", "recipe: rlhf\n"))
    with pytest.raises(ConfigError, match="unknown key"):
        load_sweep(write_yaml(tmp_path / "k.yaml", "recipe: ppo\ngird: {}\n"))
    with pytest.raises(ConfigError, match="unknown eval key"):
        load_sweep(write_yaml(tmp_path / "e.yaml", "recipe: ppo\neval: {prompts: 3}\n"))
    with pytest.raises(ConfigError, match="output_dir"):
        load_sweep(write_yaml(tmp_path / "o.yaml", "recipe: dpo\nconfig: {output_dir: x}\n"))


class FakeRecipe:
    """Stands in for train + evaluate: writes a metrics.jsonl, returns an evaluation; fails on request."""

    def __init__(self, fail_when=None):
        self.calls = []
        self.fail_when = fail_when or {}

    def __call__(self, sweep, run: Run, run_dir, threads, gpu):
        self.calls.append(run.name)
        if all(run.values.get(k) == v for k, v in self.fail_when.items()) and self.fail_when:
            (run_dir / "train.log").write_text(
                "step 1\nTraceback ...\nRuntimeError: loss is nan\nppo:  57%|#####  | 4/7 [00:03<00:02]\n"
            )
            raise _failure("training", 1, run_dir / "train.log")
        train = run_dir / "train"
        (train / "checkpoints" / "step-3").mkdir(parents=True, exist_ok=True)
        ptx, kl = run.values.get("ptx_coef", 0), run.values.get("kl_coef", 0.04)
        with (train / "metrics.jsonl").open("w") as fh:
            for step in (1, 2, 3):
                fh.write(
                    json.dumps({"step": step, "rm_score": 1 + 0.1 * step / (1 + ptx), "kl": kl * step}) + "\n"
                )
        gain = 0.3 / (1 + ptx) + 0.01 * run.seed
        return {
            "rm_score": {"policy": 1.0 + gain, "baseline": 1.0},
            "win_rate_rm": {"rate": 0.5 + gain},
            "win_rate_gold": {"rate": 0.5},
            "gold_accuracy": {"policy": 0.5, "baseline": 0.5},
            "tax": {"delta_lm_loss": 0.2 - 0.1 * ptx, "accuracy_delta": -0.05 / (1 + ptx)},
            "kl_to_baseline": kl,
            "response_length": {"policy": 4.0, "baseline": 3.0},
        }


def read_csv(path):
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_sweep_writes_results_and_resumes_without_rerunning(sweep_file):
    sweep = load_sweep(sweep_file, grid=parse_grid(["kl_coef=0.01,0.1"]), seeds=2)
    fake = FakeRecipe()
    rows = run_sweep(sweep, run_fn=fake, jobs=2, log=lambda s: None)
    assert len(fake.calls) == 8 and all(r["status"] == "ok" for r in rows)
    out = sweep.out
    table = read_csv(out / "results.csv")
    assert len(table) == 8 and set(table[0]) >= {
        "ptx_coef",
        "kl_coef",
        "seed",
        "status",
        "rm_gain",
        "tax_lm_loss",
    }
    first = next(r for r in table if r["name"] == "ptx_coef-2_kl_coef-0.1_seed-43")
    assert float(first["rm_gain"]) == pytest.approx(0.1 + 0.43) and float(
        first["tax_lm_loss"]
    ) == pytest.approx(0.0)
    for name in ("report.md", "tradeoff.png", "curves.png"):
        assert (out / name).stat().st_size > 0
    # A finished run's checkpoints are dropped (disk: ~3 GB each for PPO on a 135M model); failed ones keep theirs.
    assert not list(out.glob("runs/*/train/checkpoints"))
    assert "ptx_coef=0 kl_coef=0.01" in (out / "report.md").read_text()

    # A partly finished sweep: drop one run's result (as if killed before it finished); only it runs again.
    (out / "runs" / "ptx_coef-0_kl_coef-0.1_seed-42" / "result.json").unlink()
    again = FakeRecipe()
    rows = run_sweep(sweep, run_fn=again, jobs=1, log=lambda s: None)
    assert again.calls == ["ptx_coef-0_kl_coef-0.1_seed-42"]
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)


def test_a_failed_run_is_reported_and_the_others_complete(sweep_file):
    sweep = load_sweep(sweep_file)
    lines = []
    rows = run_sweep(sweep, run_fn=FakeRecipe(fail_when={"ptx_coef": 2}), jobs=1, log=lines.append)
    status = {r["name"]: r["status"] for r in rows}
    assert status == {"ptx_coef-0_seed-42": "ok", "ptx_coef-2_seed-42": "failed"}
    failed = next(r for r in rows if r["status"] == "failed")
    # The error line is found in the log even though a progress bar was written after it.
    assert failed["error"] == "training exited with status 1: RuntimeError: loss is nan"
    report = (sweep.out / "report.md").read_text()
    assert "`ptx_coef-2_seed-42`: failed: training exited with status 1: RuntimeError: loss is nan" in report
    assert any("failed ptx_coef-2_seed-42" in line for line in lines)
    # A failed run is not marked done: the next invocation retries it (and only it).
    retry = FakeRecipe()
    rows = run_sweep(sweep, run_fn=retry, jobs=1, log=lambda s: None)
    assert retry.calls == ["ptx_coef-2_seed-42"] and all(r["status"] == "ok" for r in rows)


def test_pareto_front_and_seed_aggregation_on_worked_numbers():
    # (tax, gain): (0, 1) and (1, 3) are on the front; (2, 2) is beaten by (1, 3); (0.5, 0.5) by (0, 1).
    assert pareto_front([(2, 2), (0, 1), (1, 3), (0.5, 0.5)]) == [1, 2]
    nan = float("nan")
    base = {c: nan for c in ("win_rate_rm", "win_rate_gold", "gold_acc", "gold_acc_start", "tax_accuracy",
                             "kl", "length", "seconds")}  # fmt: skip
    rows = [
        {**base, "ptx_coef": 0, "status": "ok", "rm_gain": 1.0, "tax_lm_loss": 0.1},
        {**base, "ptx_coef": 0, "status": "ok", "rm_gain": 3.0, "tax_lm_loss": 0.3},
        {**base, "ptx_coef": 0, "status": "failed", "rm_gain": nan, "tax_lm_loss": nan},
        {**base, "ptx_coef": 1, "status": "ok", "rm_gain": 0.5, "tax_lm_loss": 0.0},
    ]
    agg = aggregate(rows, ["ptx_coef"])
    assert [a["n"] for a in agg] == [2, 1]
    assert agg[0]["rm_gain"] == 2.0 and agg[0]["rm_gain_std"] == pytest.approx(2**0.5)
    assert agg[0]["tax_lm_loss"] == pytest.approx(0.2) and agg[1]["rm_gain_std"] == 0.0


def test_the_first_run_finishes_before_the_others_start(sweep_file):
    """A run may first train missing shared inputs (PPO's embedded default trains outputs/sft and outputs/rm):
    two runs at once would both write them, so the first run of a parallel sweep goes alone."""
    import threading
    import time

    sweep = load_sweep(sweep_file, grid=parse_grid(["ptx_coef=0,1,2,3"]))
    events: list[tuple[str, str]] = []
    lock = threading.Lock()
    recipe = FakeRecipe()

    def recorded(sweep, run, run_dir, threads, gpu):
        with lock:
            events.append(("start", run.name))
        time.sleep(0.05)  # long enough for a second worker to start if it were allowed to
        result = recipe(sweep, run, run_dir, threads, gpu)
        with lock:
            events.append(("end", run.name))
        return result

    run_sweep(sweep, run_fn=recorded, jobs=4, log=lambda s: None)
    first = events[0][1]
    assert events[:2] == [("start", first), ("end", first)]
    assert sum(kind == "start" for kind, _ in events) == 4
