"""The reward-model loop on a tiny Qwen2 with the real Qwen tokenizer: learning, exact resume, the PMP head
carried into RM, batch-split invariance, the recipe, its configs and the evaluation CLI."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.config import RMConfig
from align.config_loader import load_config
from align.reward import REWARD_HEAD, RewardModel
from align.tracking import read_metrics
from align.train.process import RunSetupError
from align.train.recipe import run_recipe
from align.train.reward import load_reward_model_for_training, run_reward, train_reward_model
from align.train.reward_data import embedded_pairs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    from align.tasks import write_jsonl

    d = tmp_path_factory.mktemp("pairs")
    train = write_jsonl(d / "train.jsonl", embedded_pairs(48, 5, split="train", format_error_rate=0.5))
    held = write_jsonl(d / "heldout.jsonl", embedded_pairs(32, 5, split="heldout", format_error_rate=0.5))
    return train, held


def _cfg(model_dir, data, out, **kw):
    train, held = data
    base = dict(
        stage="rm",
        model_name_or_path=str(model_dir),
        dataset=str(train),
        eval_dataset=str(held),
        output_dir=str(out),
        max_length=64,
        batch_size=8,
        micro_batch_size=4,
        max_steps=4,
        learning_rate=2e-3,
        warmup_steps=1,
        save_steps=2,
        report_to=["none"],
        progress=False,
        dropout=0.1,  # dropout on: exact resume must restore the RNG too
    )
    base.update(kw)
    return RMConfig(**base)


def _losses(out):
    return [r["loss"] for r in read_metrics(out) if "loss" in r]  # step 0 holds only the eval point


def test_training_lowers_the_loss_and_raises_heldout_accuracy(tiny_qwen_dir, pair_files, tmp_path):
    out = tmp_path / "run"
    summary = run_reward(_cfg(tiny_qwen_dir, pair_files, out, max_steps=-1, num_epochs=2.0, dropout=None))
    assert summary["attention"]["attn_implementation"] == "align_varlen"  # said at setup, kept here
    losses = _losses(out)
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1
    assert summary["accuracy_after"] > summary["accuracy_before"]
    # evaluated before training (step 0, the curve's first point), and after each of the two epochs (6 steps)
    assert [h["step"] for h in summary["eval_history"]] == [0, 6, 12]
    assert summary["eval_history"][0]["accuracy"] == summary["accuracy_before"]
    evals = [r for r in read_metrics(out) if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 6, 12]
    assert evals[0]["eval_accuracy"] == summary["accuracy_before"] and "loss" not in evals[0]
    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["accuracy"] == {"heldout": summary["accuracy_after"]}
    assert report["accuracy_before"] == {"heldout": summary["accuracy_before"]}
    assert [h["step"] for h in report["history"]] == [0, 6, 12]
    for png in ("eval/margins.png", "eval/accuracy.png", "curves.png"):
        assert (out / png).stat().st_size > 1000, png
    assert json.loads((out / "summary.json").read_text())["train_pairs"] == 48


def test_resume_continues_the_same_loss_curve(tiny_qwen_dir, pair_files, tmp_path):
    full = tmp_path / "full"
    train_reward_model(_cfg(tiny_qwen_dir, pair_files, full, max_steps=4, eval_dataset=None))
    part = tmp_path / "part"
    cfg = _cfg(tiny_qwen_dir, pair_files, part, max_steps=4, eval_dataset=None)
    assert train_reward_model(cfg, stop_after_step=2) == {"stopped_at": 2}
    train_reward_model(cfg)  # resume=auto
    assert [r["step"] for r in read_metrics(part)] == list(range(1, 5))
    assert _losses(part) == pytest.approx(_losses(full), abs=1e-6)
    for name in ("model.safetensors", REWARD_HEAD):
        a, b = load_file(full / "final" / name), load_file(part / "final" / name)
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0)


def test_micro_batches_and_padding_do_not_change_the_update(tiny_qwen_dir, pair_files, tmp_path):
    # 8 pairs per forward pass, packed, vs 1 pair per pass (8-step accumulation), padded.
    runs = {}
    for name, kw in {
        "8x1": dict(micro_batch_size=8),
        "1x8 padded": dict(micro_batch_size=1, packing=False),
    }.items():
        out = tmp_path / name
        train_reward_model(
            _cfg(tiny_qwen_dir, pair_files, out, max_steps=2, dropout=None, eval_dataset=None, **kw)
        )
        runs[name] = (_losses(out), load_file(out / "final" / REWARD_HEAD))
    assert runs["1x8 padded"][0] == pytest.approx(runs["8x1"][0], abs=1e-5)
    torch.testing.assert_close(
        runs["1x8 padded"][1]["weight"], runs["8x1"][1]["weight"], atol=1e-5, rtol=1e-4
    )


def test_pmp_head_is_carried_into_rm(tiny_qwen_dir, pair_files, tmp_path):
    out = tmp_path / "two"
    summary = run_reward(
        _cfg(
            tiny_qwen_dir,
            pair_files,
            out,
            stage="pmp+rm",
            rm_dataset=str(pair_files[0]),
            max_steps=2,
            dropout=None,
        )
    )
    pmp_final = out / "pmp" / "final"
    assert summary["rm"]["model_from"] == str(pmp_final)
    assert summary["accuracy_after_pmp"] == summary["rm"]["accuracy_before"]
    # The RM stage's eval curve starts at the PMP model's accuracy (not scored again: the same model).
    assert summary["rm"]["eval_history"][0] == {
        "step": 0,
        "epoch": 0.0,
        "accuracy": summary["accuracy_after_pmp"],
        "accuracies": {"heldout": summary["accuracy_after_pmp"]},
    }
    # The RM stage starts from the PMP weights, head included ...
    rm_cfg = _cfg(tiny_qwen_dir, pair_files, tmp_path / "x", init_from=str(pmp_final))
    model, _, source = load_reward_model_for_training(rm_cfg)
    pmp_head = load_file(pmp_final / REWARD_HEAD)
    assert torch.equal(model.head.weight.detach(), pmp_head["weight"])
    assert torch.equal(model.head.bias.detach(), pmp_head["bias"])
    fresh, _, _ = load_reward_model_for_training(_cfg(tiny_qwen_dir, pair_files, tmp_path / "y"))
    assert not torch.equal(fresh.head.weight, model.head.weight)  # trained by PMP, not a new head
    # ... and then trains it.
    assert not torch.equal(load_file(out / "rm" / "final" / REWARD_HEAD)["weight"], pmp_head["weight"])
    top = json.loads((out / "summary.json").read_text())
    assert top["final_model"] == str(out / "rm" / "final")


def test_recipe_and_eval_cli(tiny_qwen_dir, pair_files, tmp_path, capsys):
    out = tmp_path / "launched"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            "accelerate_configs/cpu.yaml",
            "recipes/rm.py",
            "--config",
            "recipes/configs/rm/pmp.yaml",
            f"model_name_or_path={tiny_qwen_dir}",
            f"dataset={pair_files[0]}",
            f"eval_dataset={pair_files[1]}",
            f"output_dir={out}",
            "max_steps=2",
            "batch_size=4",
            "micro_batch_size=2",
            "max_length=64",
            "report_to=none",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"model:   {out / 'final'}" in proc.stdout
    reloaded = RewardModel.from_pretrained(out / "final")
    assert reloaded.config.max_length == 64

    report_dir = tmp_path / "report"
    spec = importlib.util.spec_from_file_location("rm_accuracy", ROOT / "eval" / "rm_accuracy.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    argv = [
        "--model",
        str(out / "final"),
        "--data",
        str(pair_files[1]),
        str(pair_files[0]),
        "--out",
        str(report_dir),
    ]
    assert cli.main(argv) == 0
    report = json.loads((report_dir / "report.json").read_text())
    assert set(report["accuracy"]) == {"heldout", "train"}
    assert report["datasets"]["heldout"]["pairs"] == 32
    # The evaluation of the training loop and of the CLI are the same code: the same number.
    trained = json.loads((out / "eval" / "report.json").read_text())
    assert report["accuracy"]["heldout"] == trained["accuracy"]["heldout"]
    md = (report_dir / "report.md").read_text()
    assert "| heldout | 32 |" in md and "length bias" in md
    assert (report_dir / "margins.png").stat().st_size > 1000
    assert "heldout: accuracy" in capsys.readouterr().out


def test_recipe_reports_bad_pairs_and_unknown_keys(tiny_qwen_dir, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(
        '{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a", "rejected": "a"}\n'
    )
    args = [
        "stage=rm",
        f"model_name_or_path={tiny_qwen_dir}",
        f"dataset={data}",
        f"output_dir={tmp_path / 'o'}",
    ]
    assert run_recipe(RMConfig, run_reward, argv=[*args, "report_to=none"]) == 2
    assert f"{data}:2: chosen and rejected are identical" in capsys.readouterr().err
    assert run_recipe(RMConfig, run_reward, argv=["center_reward_coef=0.1"]) == 2
    assert "unknown key 'center_reward_coef'" in capsys.readouterr().err


def test_configs_carry_the_qwen_numbers():
    for name in ("pmp", "rm"):
        cfg = load_config(RMConfig, ROOT / "recipes" / "configs" / "rm" / f"{name}.yaml")
        assert cfg.stage == name
        assert (cfg.learning_rate, cfg.lr_scheduler, cfg.warmup_steps) == (3e-6, "constant", 0)
        assert (cfg.batch_size, cfg.max_length, cfg.num_epochs, cfg.max_steps) == (64, 2048, 1.0, -1)
    rm = load_config(RMConfig, ROOT / "recipes" / "configs" / "rm" / "rm.yaml")
    assert rm.init_from == "outputs/rm-qwen/pmp/final"


def test_onpolicy_config_reads_what_sample_pairs_and_the_default_rm_run_write():
    from align.pipeline.sample_pairs import SamplePairsConfig
    from align.train.reward_data import eval_set_specs

    cfg = load_config(RMConfig, ROOT / "recipes" / "configs" / "rm" / "onpolicy.yaml")
    assert (cfg.stage, cfg.pair_grouping, cfg.eval_dataset) == ("rm", "prompt", "embedded")
    assert cfg.init_from == f"{RMConfig().output_dir}/pmp/final"  # the default pmp+rm run's PMP model
    sampled = load_config(SamplePairsConfig, ROOT / "recipes" / "configs" / "sample_pairs" / "embedded.yaml")
    assert cfg.dataset == f"{sampled.output_dir}/pairs.jsonl"
    assert sampled.embedded_split == "train"
    (name, path), *rest = eval_set_specs(cfg.eval_datasets, taken="heldout")
    assert (name, rest) == ("onpolicy", []) and path.endswith("-heldout/pairs.jsonl")


def test_eval_fraction_holds_out_pairs_never_trained(pair_files, tmp_path):
    from align.train.reward_data import load_rm_data

    cfg = _cfg("unused", pair_files, tmp_path / "o", eval_dataset=None, eval_fraction=0.25)
    train, report, _, held, name = load_rm_data(cfg, tmp_path / "o", is_main=True)
    assert (len(train), len(held), name, report.used) == (36, 12, "heldout", 48)
    key = lambda p: json.dumps(p, sort_keys=True)  # noqa: E731
    assert not {key(p) for p in train} & {key(p) for p in held}
    again = load_rm_data(cfg, tmp_path / "o", is_main=True)
    assert again[3] == held  # seeded: the same split every time


# --------------------------------------------------------------------------------------------------
# Grouped comparisons (pair_grouping=prompt) and the extra held-out sets


def _grouped_records(n_prompts: int, offset: int = 0) -> list[dict]:
    """sample_pairs-like records: prompt k has 1-2 right and 1-3 wrong replies, every right-wrong pair
    (so 1 to 6 pairs over 2 to 5 distinct replies per prompt), and one pair without a group at the end."""
    records = []
    for k in range(offset, offset + n_prompts):
        a, b = 3 + k, 11 + 2 * k
        prompt = [{"role": "user", "content": f"What is {a}+{b}? Answer with the number only."}]
        right = [str(a + b), f"The answer is {a + b}."][: 1 + k % 2]
        wrong = [str(a + b + 1), str(a * b), f"{a}{b}"][: 1 + k % 3]
        for r in right:
            for w in wrong:
                records.append(
                    {
                        "prompt": prompt,
                        "chosen": [{"role": "assistant", "content": r}],
                        "rejected": [{"role": "assistant", "content": w}],
                        "group": k,
                        "source": f"prompts.jsonl:{k + 1}",
                        "chosen_is_reference": False,
                    }
                )
    records.append({"prompt": "Say yes.", "chosen": "yes", "rejected": "no"})  # no group: its own
    return records


@pytest.fixture(scope="module")
def grouped_files(tmp_path_factory):
    from align.tasks import write_jsonl

    d = tmp_path_factory.mktemp("grouped")
    train = write_jsonl(d / "train.jsonl", _grouped_records(7))  # 8 groups
    held = write_jsonl(d / "heldout.jsonl", _grouped_records(3, offset=20))
    onpolicy = d / "onpolicy-heldout" / "pairs.jsonl"
    onpolicy.parent.mkdir()
    write_jsonl(onpolicy, _grouped_records(2, offset=40))
    return train, held, onpolicy


def _grouped_cfg(model_dir, files, out, **kw):
    train, held, onpolicy = files
    base = dict(
        pair_grouping="prompt",
        eval_dataset=str(held),
        eval_datasets=[f"onpolicy={onpolicy}"],
        batch_size=8,  # groups: all 8 in each step
        micro_batch_size=4,
        max_steps=2,
        save_steps=0,
        dropout=None,
    )
    base.update(kw)
    return _cfg(model_dir, (train, held), out, **base)


def test_grouped_comparisons_score_each_distinct_response_once(
    tiny_qwen_dir, grouped_files, tmp_path, monkeypatch
):
    import align.train.reward as reward_train
    from align.data import load_preference, tokenize_preference
    from align.data.groups import prompt_groups
    from align.reward import pack_pairs

    cfg = _grouped_cfg(tiny_qwen_dir, grouped_files, tmp_path / "grouped")
    rows_scored: list[int] = []  # sequences read by the head, per training forward pass
    load = reward_train.load_reward_model_for_training

    def load_and_count(c):
        model, tokenizer, source = load(c)
        model.head.register_forward_hook(
            lambda mod, args, _: rows_scored.append(args[0].shape[0]) if mod.training else None
        )
        return model, tokenizer, source

    monkeypatch.setattr(reward_train, "load_reward_model_for_training", load_and_count)
    summary = train_reward_model(cfg)

    pairs, _ = load_preference(grouped_files[0])
    groups = prompt_groups(pairs)
    replies = [{json.dumps(pairs[i][s]) for i in g for s in ("chosen", "rejected")} for g in groups]
    distinct = sum(len(r) for r in replies)
    assert (len(pairs), len(groups), distinct) == (20, 8, 25)  # per pair: 40 sequences
    assert (summary["train_pairs"], summary["train_groups"], summary["train_responses"]) == (20, 8, 25)
    # 2 steps x 2 micro-batches of 4 groups; each step scores every distinct response once.
    assert len(rows_scored) == 4 and sum(rows_scored[:2]) == sum(rows_scored[2:]) == distinct
    metrics = [r for r in read_metrics(tmp_path / "grouped") if "loss" in r]
    assert [(r["pairs"], r["responses"]) for r in metrics] == [(20, 25), (20, 25)]
    # Throughput counts training time only: each log follows an evaluation, and its window holds one step,
    # so tokens/s x the step's seconds is at most the tokens scored in it (a clock restarted after the
    # evaluation, as it once was, gave ~0 s and ~1e9 tokens/s).
    assert all(0 < r["tokens_per_s"] * r["step_seconds"] <= distinct * cfg.max_length for r in metrics)

    # Step 1's loss is the per-pair loss, computed independently: each pair's two replies scored again
    # (duplicates included) by the untrained model, -log sigmoid(r_c - r_r) averaged per prompt, then
    # over the prompts.
    model, tokenizer, _ = load(cfg)
    model.train()
    examples = tokenize_preference(
        pairs,
        tokenizer,
        max_length=cfg.max_length,
        default_system=cfg.default_system,
        end_token=cfg.end_token,
    )
    with torch.no_grad():
        rewards = [
            model(**{k: v for k, v in pack_pairs([ex]).items() if "margin" not in k}).rewards
            for ex in examples
        ]
    per_pair = [-torch.nn.functional.logsigmoid(r[0] - r[1]).item() for r in rewards]
    expected = sum(sum(per_pair[i] for i in g) / len(g) for g in groups) / len(groups)
    assert metrics[0]["loss"] == pytest.approx(expected, abs=1e-5)
    assert metrics[1]["loss"] != pytest.approx(expected, abs=1e-4)  # and the model did train

    # The eval curve starts before training, for each held-out set by name; the report names both.
    assert [h["step"] for h in summary["eval_history"]] == [0, 1, 2]
    assert set(summary["eval_history"][0]["accuracies"]) == {"heldout", "onpolicy"}
    evals = {r["step"]: r for r in read_metrics(tmp_path / "grouped") if "eval_accuracy" in r}
    assert sorted(evals) == [0, 1, 2] and all("eval_accuracy/onpolicy" in r for r in evals.values())
    report = json.loads((tmp_path / "grouped" / "eval" / "report.json").read_text())
    assert set(report["accuracy"]) == {"heldout", "onpolicy"}
    # prompts 40 and 41 (1 x 2 and 2 x 3 right-wrong pairs) and the ungrouped pair
    assert report["datasets"]["onpolicy"]["pairs"] == 1 * 2 + 2 * 3 + 1
    assert report["accuracy_before"] == summary["accuracies_before"]
    assert "| onpolicy | 9 |" in (tmp_path / "grouped" / "eval" / "report.md").read_text()


def test_grouped_update_does_not_depend_on_the_micro_batch_split(tiny_qwen_dir, grouped_files, tmp_path):
    # 8 groups (1 to 6 pairs each) per forward pass, packed, vs one group per pass (8-step accumulation),
    # padded: the same losses and weights, so each group's weight is its own, not its micro-batch's.
    runs = {}
    for name, kw in {
        "8x1": dict(micro_batch_size=8),
        "1x8 padded": dict(micro_batch_size=1, packing=False),
    }.items():
        out = tmp_path / name
        train_reward_model(
            _grouped_cfg(tiny_qwen_dir, grouped_files, out, eval_dataset=None, eval_datasets=[], **kw)
        )
        runs[name] = (_losses(out), load_file(out / "final" / REWARD_HEAD))
    assert runs["1x8 padded"][0] == pytest.approx(runs["8x1"][0], abs=1e-5)
    torch.testing.assert_close(
        runs["1x8 padded"][1]["weight"], runs["8x1"][1]["weight"], atol=1e-5, rtol=1e-4
    )


def test_grouped_data_checks_and_split(grouped_files, tmp_path):
    from align.data import DataError
    from align.data.groups import prompt_groups
    from align.train.reward_data import eval_set_specs, load_rm_data

    # eval_fraction under grouping holds out whole prompts: no held-out prompt is trained on.
    cfg = _grouped_cfg("unused", grouped_files, tmp_path / "o", eval_dataset=None, eval_fraction=0.25)
    train, _, _, held, _ = load_rm_data(cfg, tmp_path / "o", is_main=True)
    prompt = lambda p: json.dumps(p["prompt"])  # noqa: E731
    assert len(prompt_groups(held)) == 2 and len(train) + len(held) == 20
    assert not {prompt(p) for p in train} & {prompt(p) for p in held}
    # A group that mixes prompts stops the stage at the pair's file:line.
    bad = tmp_path / "bad.jsonl"
    records = _grouped_records(2)
    records[-2]["group"] = 0  # prompt 1's last pair claims prompt 0's group
    bad.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(DataError, match=rf"{bad}:{len(records) - 1}: group 0 mixes prompts"):
        load_rm_data(dataclasses.replace(cfg, dataset=str(bad)), tmp_path / "o", is_main=True)
    # Held-out sets are named `name=path`, or by their file name; two of one name are refused.
    assert eval_set_specs(["a=x/pairs.jsonl", "y/other.jsonl.gz"]) == [
        ("a", "x/pairs.jsonl"),
        ("other", "y/other.jsonl.gz"),
    ]
    with pytest.raises(RunSetupError, match="2 held-out sets are named 'pairs'"):
        eval_set_specs(["x/pairs.jsonl", "y/pairs.jsonl"])
    with pytest.raises(RunSetupError, match="and the main held-out set"):
        eval_set_specs(["heldout=x.jsonl"], taken="heldout")


def test_a_checkpoint_from_another_start_model_is_refused(
    qwen_tokenizer, tiny_qwen_dir, pair_files, tmp_path
):
    """`model_name_or_path: auto` names another model once the SFT default exists: a run resuming in the same
    output_dir must not continue the other start's checkpoint (it did, and crashed later on its summary)."""
    from align.train.process import RunSetupError
    from tests.conftest import build_tiny_qwen2

    out = tmp_path / "rm"
    cfg = _cfg(tiny_qwen_dir, pair_files, out, max_steps=4, eval_dataset=None)
    assert train_reward_model(cfg, stop_after_step=2) == {"stopped_at": 2}  # checkpoint step-2
    other = build_tiny_qwen2(qwen_tokenizer, tmp_path / "other-start", seed=5)
    with pytest.raises(RunSetupError, match=r"was trained from .*this run starts from .*other-start"):
        train_reward_model(_cfg(other, pair_files, out, max_steps=4, eval_dataset=None))
    assert train_reward_model(cfg)["steps"] == 4  # the same start resumes as before


# --------------------------------------------------------------------------------------------------
# Ensembles: num_heads > 1, each head on its own bootstrap weighting of the data


def test_bootstrap_weights_are_a_function_of_seed_head_and_item_only():
    from align.train.reward_heads import bootstrap_weights

    table = bootstrap_weights(range(8), 2, seed=0, kind="poisson")
    # Pinned: a resumed run, or a later align, must draw the same ensemble.
    assert table.tolist() == [[0, 2], [0, 1], [1, 1], [1, 1], [0, 1], [1, 0], [1, 3], [2, 2]]
    # An item's weights do not depend on the other items of its batch, nor on their order.
    assert torch.equal(bootstrap_weights([6, 3, 6], 2, seed=0, kind="poisson"), table[[6, 3, 6]])
    assert not torch.equal(bootstrap_weights(range(8), 2, seed=1, kind="poisson"), table)
    many = bootstrap_weights(range(4000), 3, seed=0, kind="poisson")
    assert many.mean().item() == pytest.approx(1.0, abs=0.03)  # Poisson(1): mean 1, P(0) = e^-1
    assert (many == 0).float().mean().item() == pytest.approx(0.368, abs=0.02)
    assert (many[:, 0] != many[:, 1]).any()  # the heads draw independently
    half = bootstrap_weights(range(4000), 3, seed=0, kind="bernoulli")
    assert set(half.unique().tolist()) == {0.0, 1.0} and half.mean().item() == pytest.approx(0.5, abs=0.02)
    assert torch.equal(bootstrap_weights(range(5), 3, seed=0, kind="none"), torch.ones(5, 3))


def test_grouped_ensemble_loss_weighs_each_group_by_its_draw_over_its_comparisons():
    from align.losses import ensemble_pairwise_loss
    from align.train.reward_heads import micro_batch_ensemble_loss

    # Group 0: responses 0-2, comparisons (0, 1) and (0, 2); group 1: responses 3-4, comparison (3, 4).
    members = torch.tensor([[1.0, 0.5], [0.0, 1.0], [0.5, 0.0], [0.0, 2.0], [1.0, 0.0]])
    index = {
        "chosen_index": torch.tensor([0, 0, 3]),
        "rejected_index": torch.tensor([1, 2, 4]),
        "group_of_pair": torch.tensor([0, 0, 1]),
    }
    draws = torch.tensor([[1.0, 2.0], [3.0, 0.0]])  # (groups, K): the bootstrap unit is the group
    loss, stats = micro_batch_ensemble_loss(members, draws, index, None, 0.0, normalizer=draws.sum(0))
    # A comparison weighs its group's draw / the group's comparison count: each prompt counts once per draw.
    per_pair = torch.tensor([[0.5, 1.0], [0.5, 1.0], [3.0, 0.0]])
    want, _ = ensemble_pairwise_loss(members[[0, 0, 3]], members[[1, 2, 4]], per_pair, normalizer=[4.0, 2.0])
    assert loss.item() == pytest.approx(want.item(), abs=1e-7)
    assert stats["weight_sum"].tolist() == [4.0, 2.0]  # = the groups' draws
    # The pair layout (chosen_1, rejected_1, ...) is the same loss with one comparison per group.
    pairs = members[[0, 1, 0, 2, 3, 4]]
    flat, _ = micro_batch_ensemble_loss(pairs, per_pair, None, None, 0.0, normalizer=torch.tensor([4.0, 2.0]))
    assert flat.item() == pytest.approx(want.item(), abs=1e-7)


def test_a_one_head_model_is_widened_and_other_head_counts_are_refused(tiny_qwen_dir, pair_files, tmp_path):
    from align.data import end_token_id
    from align.models import load_tokenizer
    from align.train.reward_heads import widen_head

    tokenizer = load_tokenizer(str(tiny_qwen_dir))
    end = end_token_id(tokenizer, "<|im_end|>")
    for k in (1, 3):
        RewardModel.from_backbone(tiny_qwen_dir, end_token_id=end, seed=0, num_heads=k).save_pretrained(
            tmp_path / f"heads{k}", tokenizer=tokenizer
        )
    one = RewardModel.from_pretrained(tmp_path / "heads1").head
    cfg = lambda start, **kw: _cfg(tiny_qwen_dir, pair_files, tmp_path / "o", init_from=str(start), **kw)  # noqa: E731
    # head_init_noise 0: three exact copies of the one head.
    model, _, _ = load_reward_model_for_training(cfg(tmp_path / "heads1", num_heads=3, head_init_noise=0.0))
    assert model.config.num_heads == 3 and model.head.weight.shape == (3, one.in_features)
    assert torch.equal(model.head.weight.detach(), one.weight.detach().expand(3, -1))
    assert torch.equal(model.head.bias.detach(), one.bias.detach().expand(3))
    # The default: the one head plus seeded noise of a new head's scale; head k's start does not depend on K.
    wide = widen_head(one, 3, seed=0, noise=1.0).weight.detach()
    assert torch.equal(widen_head(one, 2, seed=0, noise=1.0).weight.detach(), wide[:2])
    spread = (wide - one.weight.detach()).std().item()
    assert spread == pytest.approx(1 / (one.in_features + 1) ** 0.5, rel=0.2)
    # A model of three heads continues with its three; no other count is guessed.
    same, _, _ = load_reward_model_for_training(cfg(tmp_path / "heads3", num_heads=3))
    assert torch.equal(same.head.weight, RewardModel.from_pretrained(tmp_path / "heads3").head.weight)
    for k in (1, 2):
        with pytest.raises(RunSetupError, match=rf"has 3 reward heads but num_heads={k}"):
            load_reward_model_for_training(cfg(tmp_path / "heads3", num_heads=k))


def test_ensemble_update_does_not_depend_on_the_micro_batch_split(tiny_qwen_dir, pair_files, tmp_path):
    # K = 3 with Poisson bootstrap: 4 pairs in one packed pass vs one pair per pass (4-step accumulation),
    # padded: the same losses and heads, so each head's normalizer is the global batch's weight sum.
    runs = {}
    for name, kw in {
        "1x4": dict(micro_batch_size=4),
        "4x1 padded": dict(micro_batch_size=1, packing=False),
    }.items():
        out = tmp_path / name
        train_reward_model(
            _cfg(
                tiny_qwen_dir, pair_files, out, batch_size=4, max_steps=3, dropout=None, eval_dataset=None,
                save_steps=0, num_heads=3, **kw,
            )
        )  # fmt: skip
        runs[name] = (read_metrics(out), load_file(out / "final" / REWARD_HEAD))
    (metrics, head), (split_metrics, split_head) = runs["1x4"], runs["4x1 padded"]
    assert head["weight"].shape[0] == 3
    for key in ("loss", "disagreement", "accuracy"):
        assert [r[key] for r in split_metrics] == pytest.approx([r[key] for r in metrics], abs=1e-5), key
    torch.testing.assert_close(split_head["weight"], head["weight"], atol=1e-5, rtol=1e-4)


def test_grouped_ensemble_update_does_not_depend_on_the_micro_batch_split(
    tiny_qwen_dir, grouped_files, tmp_path
):
    # pair_grouping=prompt with K = 3: each prompt group is one bootstrap item, whatever its pair count.
    runs = {}
    for name, kw in {
        "8x1": dict(micro_batch_size=8),
        "1x8 padded": dict(micro_batch_size=1, packing=False),
    }.items():
        out = tmp_path / name
        train_reward_model(
            _grouped_cfg(
                tiny_qwen_dir, grouped_files, out, eval_dataset=None, eval_datasets=[], num_heads=3, **kw
            )
        )
        runs[name] = (read_metrics(out), load_file(out / "final" / REWARD_HEAD))
    (metrics, head), (split_metrics, split_head) = runs["8x1"], runs["1x8 padded"]
    assert [r["loss"] for r in split_metrics] == pytest.approx([r["loss"] for r in metrics], abs=1e-5)
    assert [(r["pairs"], r["responses"]) for r in metrics] == [(20, 25), (20, 25)]
    assert metrics[-1]["disagreement"] > 0  # new heads: three independent draws
    torch.testing.assert_close(split_head["weight"], head["weight"], atol=1e-5, rtol=1e-4)


def _heldout_members(model_dir: Path, held: Path) -> torch.Tensor:
    """(P, 2, K): each head's reward of each held-out pair's chosen and rejected response."""
    from align.data import load_preference, tokenize_preference
    from align.evaluation.reward_model import score_pairs
    from align.models import load_tokenizer

    model = RewardModel.from_pretrained(model_dir)
    pairs, tokenizer = load_preference(str(held))[0], load_tokenizer(str(model_dir))
    # tokenised as the training run's held-out scoring does (_cfg's max_length, the default system prompt)
    examples = tokenize_preference(pairs, tokenizer, max_length=64, default_system=RMConfig().default_system)
    scores = score_pairs(model, examples)
    return torch.tensor([scores["chosen_members"], scores["rejected_members"]]).transpose(0, 1)


def test_bootstrap_makes_identical_heads_differ_and_without_it_they_stay_equal(
    tiny_qwen_dir, pair_files, tmp_path
):
    # PMP with one head, then RM with three exact copies of it (head_init_noise 0): only the data can tell
    # the heads apart. With Poisson bootstrap they end different; with none (the control) they stay equal.
    common = dict(
        max_steps=2, dropout=None, save_steps=0, num_heads=3, head_init_noise=0.0, eval_before=False
    )
    two_stage = dict(stage="pmp+rm", rm_dataset=str(pair_files[0]))
    summary = run_reward(_cfg(tiny_qwen_dir, pair_files, tmp_path / "boot", **two_stage, **common))
    pmp_final = tmp_path / "boot" / "pmp" / "final"
    assert RewardModel.from_pretrained(pmp_final).config.num_heads == 1  # PMP trains one head
    control_cfg = dict(init_from=str(pmp_final), head_bootstrap="none")
    control = train_reward_model(_cfg(tiny_qwen_dir, pair_files, tmp_path / "none", **control_cfg, **common))
    boot = summary["rm"]
    for run in (boot, control):
        reloaded = RewardModel.from_pretrained(run["final_model"])
        assert reloaded.config.num_heads == 3 and reloaded.head.weight.shape[0] == 3
        assert json.loads((Path(run["final_model"]) / "reward_config.json").read_text())["num_heads"] == 3
    members = _heldout_members(Path(boot["final_model"]), pair_files[1])
    assert members.shape == (32, 2, 3)
    assert (members - members[..., :1]).abs().amax().item() > 1e-3  # the heads score differently
    same = _heldout_members(Path(control["final_model"]), pair_files[1])
    torch.testing.assert_close(same, same[..., :1].expand_as(same), atol=1e-6, rtol=0)  # identical heads
    # The report: accuracy per head, of the mean and of the min, and the disagreement that tells them apart.
    heldout = boot["heads"]["eval"]["heldout"]
    assert len(heldout["head_accuracies"]) == 3 and heldout["accuracy"] == boot["accuracy_after"]
    margins = members[:, 0] - members[:, 1]  # (P, K)
    disagreement = margins.std(dim=1, unbiased=False).mean().item()
    assert heldout["disagreement"] == pytest.approx(disagreement, abs=1e-5)
    assert heldout["disagreement"] > 1e-4 and control["heads"]["eval"]["heldout"]["disagreement"] < 1e-6
    assert heldout["head_accuracies"] == pytest.approx((margins > 0).double().mean(0).tolist())
    report = json.loads((Path(boot["output_dir"]) / "eval" / "report.json").read_text())
    assert report["datasets"]["heldout"]["min_accuracy"] == heldout["min_accuracy"]
    assert "3 heads: accuracy per head" in (Path(boot["output_dir"]) / "eval" / "report.md").read_text()
    # Training batches: identical heads give step 1's disagreement 0; then they drift apart (or not).
    trained = [r["disagreement"] for r in read_metrics(tmp_path / "boot" / "rm") if "loss" in r]
    assert trained[0] == 0.0 and trained[1] > 0
    assert [r["disagreement"] for r in read_metrics(tmp_path / "none") if "loss" in r] == [0.0, 0.0]
