"""Offline DPO on tiny Qwen2 models with the real Qwen tokenizer: TRL parity, reference cache, resume, LoRA."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import chatml
from align.config import DPOConfig, GRPOConfig, OnlineDPOConfig
from align.config_loader import load_config
from align.losses import dpo_loss
from align.tasks import generate_tasks, preference_pairs, write_jsonl
from align.tracking import read_metrics
from align.train import dpo as dpo_mod
from align.train.dpo import pair_logps, run_dpo, sequence_logps, tokenize_dpo_pairs

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs"


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    pairs = preference_pairs(generate_tasks(24, seed=7), seed=7, format_error_rate=0.3)
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", pairs)


@pytest.fixture(scope="module")
def other_ref_dir(qwen_tokenizer, tmp_path_factory):
    from conftest import build_tiny_qwen2

    return build_tiny_qwen2(qwen_tokenizer, tmp_path_factory.mktemp("tiny-ref"), seed=1)


@pytest.fixture(scope="module")
def other_byte_dir(tmp_path_factory):
    from conftest import build_tiny_qwen2, byte_tokenizer

    return build_tiny_qwen2(byte_tokenizer(), tmp_path_factory.mktemp("tiny-byte-ref"), seed=1)


def _cfg(model_dir, data, out, **kw):
    base = dict(
        model_name_or_path=str(model_dir),
        dataset=str(data),
        output_dir=str(out),
        max_length=512,
        batch_size=8,
        micro_batch_size=4,
        max_steps=2,
        learning_rate=1e-3,
        warmup_steps=0,
        save_steps=1,
        save_total_limit=5,
        eval_tasks=0,
        report_to=["none"],
        progress=False,
        rpo_alpha=0.0,  # plain DPO: the loss starts at log 2 (the embedded default adds an NLL term)
    )
    base.update(kw)
    return DPOConfig(**base)


def _tokenized(tokenizer, n=4, seed=3):
    pairs = preference_pairs(generate_tasks(n, seed=seed), seed=seed, format_error_rate=0.5)
    examples, skipped = tokenize_dpo_pairs(pairs, tokenizer, max_length=None)
    assert skipped == 0
    return pairs, examples


def test_packed_logps_equal_one_forward_per_sequence(tiny_qwen_dir, qwen_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir)
    _, examples = _tokenized(qwen_tokenizer)
    seqs = [ex[s] for ex in examples for s in ("chosen", "rejected")]
    sums, counts = sequence_logps(model, seqs, torch.device("cpu"))
    for seq, got, n in zip(seqs, sums, counts, strict=True):
        ids = torch.tensor([seq["input_ids"]])
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        labels = torch.tensor(seq["labels"][1:])
        trained = labels != -100
        expected = logp[trained].gather(-1, labels[trained][:, None]).sum()
        assert got.item() == pytest.approx(expected.item(), abs=1e-4)
        assert n.item() == int(trained.sum())
    # The labels mark exactly the final reply and its <|im_end|>, not the newline after it.
    _, im_end = chatml.chatml_token_ids(qwen_tokenizer)
    first = examples[0]["chosen"]
    trained_ids = [t for t in first["labels"] if t != -100]
    assert trained_ids[-1] == im_end and first["input_ids"][-1] != im_end


def test_sigmoid_loss_equals_the_loss_trl_dpotrainer_logs(
    tiny_qwen_dir, other_ref_dir, qwen_tokenizer, tmp_path
):
    from datasets import Dataset
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    pairs, examples = _tokenized(qwen_tokenizer)
    # float64 on both sides, so the comparison sees the formulas, not fp32 rounding of 151k-way softmaxes.
    policy = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir, dtype=torch.float64)
    reference = AutoModelForCausalLM.from_pretrained(other_ref_dir, dtype=torch.float64)
    with torch.no_grad():
        pc, pr, _, _ = pair_logps(policy, examples, torch.device("cpu"))
        rc, rr, _, _ = pair_logps(reference, examples, torch.device("cpu"))
    ours, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="sigmoid")
    assert abs(ours.item() - 0.6931) > 1e-3

    # TRL sees the same tokens: the prompt rendered with the generation header, each reply + <|im_end|>.
    records = [
        {
            "prompt": chatml.render_conversation(p["prompt"], None, add_generation_prompt=True),
            "chosen": p["chosen"] + chatml.IM_END,
            "rejected": p["rejected"] + chatml.IM_END,
        }
        for p in pairs
    ]
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen_dir)
    assert tokenizer.eos_token == chatml.IM_END  # so TRL appends nothing to the replies
    args = TRLDPOConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=4,
        max_steps=1,
        logging_steps=1,
        learning_rate=1e-9,
        beta=0.1,
        loss_type=["sigmoid"],
        max_length=None,
        report_to="none",
        use_cpu=True,
        bf16=False,  # TRL's default is bf16 autocast
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = DPOTrainer(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=Dataset.from_list(records),
        processing_class=tokenizer,
    )
    try:
        trainer.train()
    finally:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)  # later runs build their own
    logged = next(h for h in trainer.state.log_history if "loss" in h)
    print(f"TRL logged loss {logged['loss']:.8f}, ours {ours.item():.8f}")
    assert logged["loss"] == pytest.approx(ours.item(), abs=1e-5)
    # TRL's fused LM head projects in fp32, so its per-sequence sums carry fp32 rounding (~1e-5 nats a token).
    margins = (0.1 * ((pc - rc) - (pr - rr))).mean().item()
    assert logged["rewards/margins"] == pytest.approx(margins, abs=5e-5)


def test_reference_cache_is_reused_and_invalidated(
    tiny_byte_dir, other_byte_dir, pairs_file, tmp_path, monkeypatch
):
    calls = {"compute": 0, "load": 0}
    real_compute, real_load = dpo_mod.compute_reference_logps, dpo_mod.load_frozen_lm

    def counting_compute(*a, **k):
        calls["compute"] += 1
        return real_compute(*a, **k)

    loaded = []

    def counting_load(*a, **k):
        calls["load"] += 1
        loaded.append(real_load(*a, **k))
        return loaded[-1]

    monkeypatch.setattr(dpo_mod, "compute_reference_logps", counting_compute)
    monkeypatch.setattr(dpo_mod, "load_frozen_lm", counting_load)
    cache = tmp_path / "cache"
    kw = dict(max_steps=1, ref_cache_dir=str(cache), save_steps=0)
    first = run_dpo(_cfg(tiny_byte_dir, pairs_file, tmp_path / "a", **kw))
    assert calls == {"compute": 1, "load": 1} and not first["reference_cache_hit"]
    # The reference scores the packed rows through the policy's attention, not transformers' default (sdpa).
    assert (
        loaded[0].config._attn_implementation == first["attention"]["attn_implementation"] == "align_varlen"
    )
    second = run_dpo(_cfg(tiny_byte_dir, pairs_file, tmp_path / "b", **kw))
    assert calls == {"compute": 1, "load": 1}, "the second run must not touch the reference model"
    assert second["reference_cache_hit"] and second["reference_cache"] == first["reference_cache"]
    # The same loss from cached log-probs.
    assert read_metrics(tmp_path / "b")[0]["loss"] == pytest.approx(
        read_metrics(tmp_path / "a")[0]["loss"], abs=1e-7
    )
    # Other data: recomputed.
    other = tmp_path / "other.jsonl"
    lines = pairs_file.read_text().splitlines()
    other.write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # the same pairs, another order
    run_dpo(_cfg(tiny_byte_dir, other, tmp_path / "c", **kw))
    assert calls == {"compute": 2, "load": 2}
    # Another reference: recomputed.
    third = run_dpo(_cfg(tiny_byte_dir, pairs_file, tmp_path / "d", ref_model_path=str(other_byte_dir), **kw))
    assert calls == {"compute": 3, "load": 3} and third["reference_cache"] != first["reference_cache"]
    # Another attention: recomputed (another kernel rounds differently), through that attention.
    run_dpo(_cfg(tiny_byte_dir, pairs_file, tmp_path / "e", attn_implementation="sdpa", **kw))
    assert calls == {"compute": 4, "load": 4} and loaded[-1].config._attn_implementation == "sdpa"
    assert len(list(cache.glob("ref-logps-*.pt"))) == 4
    # Same reference, first step: policy == reference, so every pair has margin 0 and the loss is log 2.
    assert read_metrics(tmp_path / "a")[0]["loss"] == pytest.approx(0.693147, abs=1e-5)
    assert read_metrics(tmp_path / "d")[0]["loss"] != pytest.approx(0.693147, abs=1e-3)


def test_resume_continues_the_same_curve(tiny_byte_dir, pairs_file, tmp_path):
    kw = dict(max_steps=3, dropout=0.1, rpo_alpha=0.5)  # dropout on: exact resume must restore the RNG too
    full = tmp_path / "full"
    run_dpo(_cfg(tiny_byte_dir, pairs_file, full, **kw))
    part = tmp_path / "part"
    assert run_dpo(_cfg(tiny_byte_dir, pairs_file, part, **kw), stop_after_step=1) == {"stopped_at": 1}
    run_dpo(_cfg(tiny_byte_dir, pairs_file, part, **kw))
    a, b = read_metrics(full), read_metrics(part)
    assert [r["step"] for r in b] == [1, 2, 3]
    for key in ("loss", "rewards_margin", "nll"):
        assert [r[key] for r in b] == pytest.approx([r[key] for r in a], abs=1e-6), key
    wa, wb = load_file(full / "final" / "model.safetensors"), load_file(part / "final" / "model.safetensors")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], atol=1e-6, rtol=0)


def test_gradient_accumulation_and_dpo_learns(tiny_byte_dir, pairs_file, tmp_path):
    runs = {}
    for micro in (8, 4):
        out = tmp_path / f"m{micro}"
        run_dpo(_cfg(tiny_byte_dir, pairs_file, out, micro_batch_size=micro, max_steps=3, save_steps=0))
        runs[micro] = read_metrics(out)
    assert [r["loss"] for r in runs[4]] == pytest.approx([r["loss"] for r in runs[8]], abs=2e-5)
    losses = [r["loss"] for r in runs[8]]
    assert losses[-1] < losses[0] - 0.03, losses
    assert runs[8][-1]["rewards_margin"] > 0


def test_lora_reference_is_the_adapter_disabled_policy(tiny_byte_dir, pairs_file, tmp_path, monkeypatch):
    monkeypatch.setattr(
        dpo_mod, "load_frozen_lm", lambda *a, **k: pytest.fail("LoRA needs no reference copy")
    )
    out = tmp_path / "lora"
    summary = run_dpo(
        _cfg(tiny_byte_dir, pairs_file, out, use_lora=True, lora_r=4, lora_alpha=8, max_steps=2, save_steps=0)
    )
    first = read_metrics(out)[0]
    assert first["loss"] == pytest.approx(0.693147, abs=1e-6)  # B = 0 at the start: the policy is the base
    assert first["rewards_margin"] == pytest.approx(0.0, abs=1e-6)
    cached = torch.load(summary["reference_cache"])
    base = AutoModelForCausalLM.from_pretrained(tiny_byte_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_byte_dir)
    from align.data import load_preference

    pairs, _ = load_preference(str(pairs_file))
    examples, _ = tokenize_dpo_pairs(pairs, tokenizer, max_length=512)
    with torch.no_grad():
        c, r, _, _ = pair_logps(base, examples[:4], torch.device("cpu"))
    torch.testing.assert_close(cached["chosen"][:4], c, atol=1e-4, rtol=0)
    torch.testing.assert_close(cached["rejected"][:4], r, atol=1e-4, rtol=0)
    assert (out / "final" / "adapter" / "adapter_config.json").is_file()


def test_recipe_configs_load():
    dpo = load_config(DPOConfig, CONFIGS / "dpo" / "qwen.yaml")
    assert (
        dpo.learning_rate == pytest.approx(7e-7) and dpo.num_epochs == 1.0 and dpo.beta == pytest.approx(0.1)
    )
    assert dpo.max_steps == -1
    assert load_config(GRPOConfig, CONFIGS / "grpo" / "qwen.yaml").samples_per_query == 8
    assert load_config(OnlineDPOConfig, CONFIGS / "online_dpo" / "qwen.yaml").samples_per_query >= 2
