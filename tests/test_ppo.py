"""PPO on tiny Qwen2 models: Qwen specifics, invariants, a rule-based reward that must rise, resume."""

import json

import pytest
import torch
from conftest import ascii_reward
from safetensors.torch import load_file

from align.config import PPOConfig
from align.tracking import read_metrics
from align.train.ppo import ptx_lm_loss, run_ppo


def _cfg(policy, rm, prompts, out, **kw):
    base = dict(
        model_name_or_path=str(policy),
        reward_model_path=str(rm),
        dataset=str(prompts),
        output_dir=str(out),
        batch_size=4,
        micro_batch_size=4,
        samples_per_query=2,
        max_new_tokens=6,
        max_steps=3,
        value_warmup_steps=1,
        ppo_epochs=1,
        policy_lr=1e-3,
        value_lr=1e-3,
        ptx_coef=0.0,
        save_steps=1,
        save_total_limit=5,
        report_to=["none"],
        progress=False,
        train_missing_stages=False,
        log_rollouts=0,
    )
    base.update(kw)
    return PPOConfig(**base)


def test_four_models_first_epoch_ratio_and_warmup(tiny_byte_dir, tiny_rm_dir, prompts_file, tmp_path):
    out = tmp_path / "ppo"
    run_ppo(
        _cfg(
            tiny_byte_dir,
            tiny_rm_dir,
            prompts_file,
            out,
            value_warmup_steps=2,
            log_rollouts=2,
            offload_frozen=True,
        )
    )
    records = read_metrics(out)
    logged = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 1, 2, 2, 3, 3]
    assert {"query", "prompt", "response", "score", "finished"} <= set(logged[0])
    assert [r["value_warmup"] for r in records] == [1, 1, 0]
    # Warm-up steps train no policy: no policy statistics at all.
    assert "ratio_mean" not in records[0] and "ratio_mean" in records[2]
    # One epoch, one mini-batch: the policy is scored on exactly the data it sampled, so ratio = 1.
    assert records[2]["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert records[2]["clipfrac"] == 0.0
    assert records[2]["approx_kl"] == pytest.approx(0.0, abs=1e-6)
    for key in (
        "rm_score",
        "score_normalised",
        "kl",
        "entropy",
        "response_length",
        "no_eos_frac",
        "value_loss",
        "explained_variance",
        "time_rollout",
        "time_scoring",
        "time_training",
        "response_tokens_per_s",
    ):
        assert key in records[-1], key
    initial = load_file(tiny_byte_dir / "model.safetensors")
    ckpts = out / "checkpoints"

    def policy_at(step):
        state = load_file(ckpts / f"step-{step}" / "model.safetensors")
        return {k[len("policy/") :]: v for k, v in state.items() if k.startswith("policy/")}

    def value_at(step):
        state = load_file(ckpts / f"step-{step}" / "model.safetensors")
        return {k: v for k, v in state.items() if k.startswith("value/")}

    for name, tensor in policy_at(2).items():
        assert torch.equal(tensor, initial[name]), f"{name} changed during the value warm-up"
    assert any(not torch.equal(policy_at(3)[n], initial[n]) for n in initial)
    assert any(not torch.equal(value_at(1)[n], value_at(2)[n]) for n in value_at(1))


def test_samples_per_query_are_all_used(tiny_byte_dir, tiny_rm_dir, prompts_file, tmp_path):
    seen = []

    def counting_reward(batch, texts):
        seen.append(batch.prompt_index.tolist())
        return torch.zeros(len(texts))

    run_ppo(
        _cfg(
            tiny_byte_dir,
            tiny_rm_dir,
            prompts_file,
            tmp_path / "o",
            samples_per_query=3,
            max_steps=1,
            batch_size=2,
            micro_batch_size=3,
        ),
        reward_fn=counting_reward,
    )
    assert seen == [[0, 0, 0, 1, 1, 1]]


def test_rule_based_reward_rises(tiny_byte_dir, tiny_rm_dir, prompts_file, tmp_path):
    out = tmp_path / "rule"
    cfg = _cfg(
        tiny_byte_dir,
        tiny_rm_dir,
        prompts_file,
        out,
        max_steps=14,
        value_warmup_steps=0,
        ppo_epochs=2,
        batch_size=8,
        micro_batch_size=16,
        max_new_tokens=8,
        policy_lr=3e-2,
        kl_coef=0.0,
        reward_norm="none",
        missing_eos_penalty=None,
        save_steps=0,
    )
    run_ppo(cfg, reward_fn=ascii_reward)
    scores = [r["score_normalised"] for r in read_metrics(out)]
    assert sum(scores[:2]) / 2 < 0.6  # a random model: about half its tokens are ASCII bytes
    assert sum(scores[-3:]) / 3 > 0.85, scores


# The over-optimisation guards keep run state (PAR anchors, the KL controller): a resume must restore it.
GUARDS = dict(kl_target=0.5, kl_horizon=8, reward_anchor="reference", reward_clip=0.6)


@pytest.mark.parametrize("guards", [{}, GUARDS], ids=["plain", "guards"])
def test_resume_reproduces_the_uninterrupted_run(tiny_byte_dir, tiny_rm_dir, prompts_file, tmp_path, guards):
    kw = dict(max_steps=4, value_warmup_steps=1, ptx_coef=0.5, ptx_max_length=32, ppo_epochs=2, **guards)
    # The random policy's greedy answers never close, so the RM could read no reference answer (refused):
    # the guarded run is scored by a rule, which reads any text.
    scorer = ascii_reward if guards else None
    full = tmp_path / "full"
    run_ppo(_cfg(tiny_byte_dir, tiny_rm_dir, prompts_file, full, **kw), reward_fn=scorer)
    part = tmp_path / "part"
    assert run_ppo(
        _cfg(tiny_byte_dir, tiny_rm_dir, prompts_file, part, **kw), stop_after_step=2, reward_fn=scorer
    ) == {"stopped_at": 2}
    run_ppo(_cfg(tiny_byte_dir, tiny_rm_dir, prompts_file, part, **kw), reward_fn=scorer)
    a, b = read_metrics(full), read_metrics(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    keys = ["rm_score", "value_loss", "kl", "ptx_loss", "reward_running_mean", "kl_coef", "score_normalised"]
    for key in keys + (["reward_anchor_mean", "reward_clipped_frac"] if guards else []):
        assert [r.get(key) for r in b] == pytest.approx([r.get(key) for r in a], abs=1e-6), key
    coefs = [r["kl_coef"] for r in a]
    if guards:
        # The warm-up iteration does not move the coefficient; each later one does, by the controller's rule.
        assert coefs[:2] == [0.04, 0.04] and len(set(coefs[1:])) == 3
        for before, after, r in zip(coefs[1:], coefs[2:], a[1:], strict=False):
            assert after == pytest.approx(before * (1 + min(max(r["kl"] / 0.5 - 1, -0.2), 0.2) * 8 / 8))
        assert all(0.0 < r["reward_anchor_mean"] < 1.0 for r in a)
    else:
        assert coefs == [0.04] * 4 and "reward_anchor_mean" not in a[0]


def test_ptx_gradient_only_when_its_coefficient_is_positive(
    tiny_byte_dir, tiny_rm_dir, prompts_file, tmp_path
):
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(tiny_byte_dir)
    rows = [[1, 2, 3, 4], [5, 6, 7]]
    loss = ptx_lm_loss(policy, rows, torch.device("cpu"))
    # Reference: each row's own next-token loss, token-mean over the 3 + 2 predicted tokens.
    ref_sum = 0.0
    for row in rows:
        logits = policy(torch.tensor([row])).logits[0, :-1]
        ref_sum += torch.nn.functional.cross_entropy(logits, torch.tensor(row[1:]), reduction="sum").item()
    assert loss.item() == pytest.approx(ref_sum / 5, rel=1e-5)
    loss.backward()
    assert policy.model.embed_tokens.weight.grad is not None
    on = read_metrics_of_run(tiny_byte_dir, tiny_rm_dir, prompts_file, tmp_path / "on", 0.5)
    off = read_metrics_of_run(tiny_byte_dir, tiny_rm_dir, prompts_file, tmp_path / "off", 0.0)
    assert "ptx_loss" in on[-1] and on[-1]["ptx_loss"] > 0
    assert "ptx_loss" not in off[-1]


def read_metrics_of_run(policy, rm, prompts, out, ptx_coef):
    run_ppo(
        _cfg(
            policy, rm, prompts, out, max_steps=2, value_warmup_steps=1, ptx_coef=ptx_coef, ptx_max_length=32
        )
    )
    return read_metrics(out)


def test_lora_policy_uses_the_adapter_free_weights_as_reference(
    tiny_byte_dir, tiny_rm_dir, prompts_file, tmp_path
):
    out = tmp_path / "lora"
    run_ppo(
        _cfg(tiny_byte_dir, tiny_rm_dir, prompts_file, out, use_lora=True, lora_r=4, lora_alpha=8, max_steps=2,
             value_warmup_steps=0, ref_dtype="bfloat16"),
        reward_fn=ascii_reward,
    )  # fmt: skip
    records = read_metrics(out)
    # Before any update the adapter is zero, so policy and reference agree: KL 0 in the first iteration.
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    saved = load_file(out / "checkpoints" / "step-2" / "model.safetensors")
    assert any("lora_" in k for k in saved if k.startswith("policy/"))
    assert not any(k.startswith("policy/") and "lora_" not in k for k in saved)
    assert (out / "final" / "adapter" / "adapter_config.json").is_file()


# --- issue #13: the RM's settings, scores the RM could not read, schedules, the KL coefficient -------------


def _rm_with(tiny_byte_dir, path, **kw):
    from transformers import AutoTokenizer

    from align.reward import RewardModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_byte_dir)
    rm = RewardModel.from_backbone(tiny_byte_dir, seed=0, **kw)
    return rm.save_pretrained(path, tokenizer), tokenizer


def test_ppo_refuses_a_reward_model_whose_end_token_the_policy_never_emits(
    tiny_byte_dir, prompts_file, tmp_path
):
    # An RM reading its score at "!" scores every rollout (which stops at <|im_end|>) as unclosed: -10,
    # centred away to no signal. The old loop trained on that silently.
    from transformers import AutoTokenizer

    from align.train.process import RunSetupError

    bang = AutoTokenizer.from_pretrained(tiny_byte_dir).convert_tokens_to_ids("!")
    rm, _ = _rm_with(tiny_byte_dir, tmp_path / "rm-bang", end_token="!", end_token_id=bang)
    with pytest.raises(RunSetupError, match=r"reads its score at '!'.*rollouts stop only on"):
        run_ppo(_cfg(tiny_byte_dir, rm, prompts_file, tmp_path / "ppo", max_steps=1))


def test_ppo_prompts_carry_the_reward_models_system_prompt(
    tiny_byte_dir, prompts_file, tmp_path, monkeypatch
):
    import chatml

    _, im_end = chatml.chatml_token_ids(
        __import__("transformers").AutoTokenizer.from_pretrained(tiny_byte_dir)
    )
    rm, _ = _rm_with(tiny_byte_dir, tmp_path / "rm-sys", end_token_id=im_end, default_system="Be brief.")
    seen = []
    real = chatml.encode_prompt

    def spy(messages, tokenizer, default_system=None):
        seen.append(default_system)
        return real(messages, tokenizer, default_system=default_system)

    monkeypatch.setattr(chatml, "encode_prompt", spy)
    run_ppo(_cfg(tiny_byte_dir, rm, prompts_file, tmp_path / "ppo", max_steps=1, value_warmup_steps=1))
    assert seen and set(seen) == {"Be brief."}
    # An explicit, different system prompt is a mismatch the run cannot fix: refused.
    from align.train.process import RunSetupError

    with pytest.raises(RunSetupError, match="trained with 'Be brief.'"):
        run_ppo(_cfg(tiny_byte_dir, rm, prompts_file, tmp_path / "ppo2", max_steps=1, default_system="Hi."))


def test_policy_schedule_finishes_after_the_value_warmup(
    tiny_byte_dir, tiny_rm_dir, prompts_file, tmp_path, monkeypatch
):
    # The policy steps only after the value warm-up (here 1 of 3 iterations): a linear decay built for 3
    # steps but stepped twice ended at 1/3 of the peak, never reaching its floor.
    import align.train.ppo as ppo

    built = []
    real = ppo.build_scheduler

    def spy(optimizer, cfg, total):
        built.append(real(optimizer, cfg, total))
        return built[-1]

    monkeypatch.setattr(ppo, "build_scheduler", spy)
    cfg = _cfg(tiny_byte_dir, tiny_rm_dir, prompts_file, tmp_path / "ppo", max_steps=3, value_warmup_steps=1,
               lr_scheduler="linear", warmup_steps=0, save_steps=0)  # fmt: skip
    run_ppo(cfg)
    policy_sched = built[0]  # built first: the policy's, then the value model's
    floor = cfg.policy_lr * cfg.min_lr_ratio
    assert policy_sched.get_last_lr()[0] == pytest.approx(floor, abs=1e-12)
    assert built[1].get_last_lr()[0] == pytest.approx(cfg.value_lr * cfg.min_lr_ratio, abs=1e-12)


def test_a_larger_kl_coef_ends_with_a_smaller_kl(tiny_byte_dir, tiny_rm_dir, prompts_file, tmp_path):
    # The rule-based reward pulls the policy away from the reference (towards ASCII bytes); the per-token
    # -kl_coef x KL reward must hold it back. Same seeds, same data: only kl_coef differs.
    def final_kl(kl_coef, name):
        out = tmp_path / name
        cfg = _cfg(tiny_byte_dir, tiny_rm_dir, prompts_file, out, max_steps=10, value_warmup_steps=0,
                   ppo_epochs=2, batch_size=8, micro_batch_size=16, max_new_tokens=8, policy_lr=3e-2,
                   kl_coef=kl_coef, reward_norm="none", missing_eos_penalty=None, save_steps=0)  # fmt: skip
        run_ppo(cfg, reward_fn=ascii_reward)
        kls = [r["kl"] for r in read_metrics(out)]
        return sum(kls[-3:]) / 3

    free, held = final_kl(0.0, "free"), final_kl(1.0, "held")
    assert held < 0.5 * free, (held, free)
