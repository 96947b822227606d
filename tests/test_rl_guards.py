"""The over-optimisation guards as the RL stages reach them (issue 21): config keys, the score phase's order
(ensemble -> clip -> anchor) on worked numbers, the adaptive KL coefficient in the loss, an ensemble reward
model's K scores, the guards' checkpointed state, the one embedded query set, and one short GRPO run."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import ascii_reward

from align.config import GRPOConfig, OnlineDPOConfig, PPOConfig
from align.config_loader import ConfigError, load_config
from align.rl_math import RunningMoments, ensemble_reward, group_scores, guarded_scores
from align.train.process import RunSetupError
from align.train.rl_common import RewardGuards, adapt_kl, load_prompts


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --------------------------------------------------------------------------------------------------
# config keys


@pytest.mark.parametrize("cls", [PPOConfig, OnlineDPOConfig, GRPOConfig], ids=lambda c: c.__name__)
def test_guard_keys_default_off_and_parse(cls):
    cfg = cls()
    assert (cfg.reward_clip, cfg.reward_anchor, cfg.rm_ensemble_objective, cfg.rm_ensemble_penalty) == (
        None, "none", "mean", 0.0,
    )  # fmt: skip
    assert cfg.query_seed is None
    guards = RewardGuards.from_config(cfg)
    assert (guards.clip, guards.anchor, guards.kl) == (None, False, None)
    cfg = load_config(
        cls, None,
        ["reward_clip=5", "reward_anchor=reference", "rm_ensemble_objective=uncertainty",
         "rm_ensemble_penalty=0.5", "query_count=40", "query_seed=7"],
    )  # fmt: skip
    assert (cfg.reward_clip, cfg.reward_anchor, cfg.rm_ensemble_penalty) == (5.0, "reference", 0.5)
    assert (cfg.query_count, cfg.query_seed) == (40, 7)


@pytest.mark.parametrize("cls", [PPOConfig, GRPOConfig], ids=lambda c: c.__name__)
def test_adaptive_kl_keys_build_the_controller(cls):
    assert (cls().kl_target, cls().kl_horizon) == (None, 10000)
    cfg = load_config(cls, None, ["kl_target=2.0", "kl_horizon=64", "kl_coef=0.1"])
    controller = RewardGuards.from_config(cfg).kl
    assert (controller.coef, controller.target, controller.horizon) == (0.1, 2.0, 64)


@pytest.mark.parametrize(
    "cls, override, message",
    [
        (PPOConfig, "reward_clip=0", "reward_clip: must be positive"),
        (GRPOConfig, "reward_clip=-2", "reward_clip: must be positive"),
        (PPOConfig, "reward_anchor=policy", "reward_anchor: 'policy' is not one of"),
        (OnlineDPOConfig, "rm_ensemble_objective=max", "rm_ensemble_objective: 'max' is not one of"),
        (PPOConfig, "rm_ensemble_penalty=-1", "rm_ensemble_penalty: must be >= 0"),
        (PPOConfig, "kl_target=0", "kl_target: must be positive"),
        (GRPOConfig, "kl_horizon=0", "kl_horizon: must be >= 1"),
        (GRPOConfig, "kl_target=abc", "kl_target: expected a number"),
        (PPOConfig, "query_count=0", "query_count: must be >= 1"),
        (GRPOConfig, "query_seed=1.5", "query_seed: expected an integer"),
        (OnlineDPOConfig, "kl_target=1.0", "unknown key 'kl_target' for OnlineDPOConfig"),
        (GRPOConfig, "embedded_prompts=8", "unknown key 'embedded_prompts'"),
        (
            PPOConfig,
            "query_kinds=[add, sum]",
            r"query_kinds: a non-empty list of distinct kinds .* got \['add', 'sum'\]",
        ),
        (GRPOConfig, "query_kinds=[add, add]", "query_kinds: a non-empty list of distinct kinds"),
        (OnlineDPOConfig, "query_kinds=[]", "query_kinds: a non-empty list"),
    ],
)
def test_bad_guard_and_query_values_are_refused_by_name(cls, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(cls, None, [override])


def test_keys_that_would_do_nothing_together_are_refused():
    with pytest.raises(ConfigError, match="kl_target=1.0 needs kl_coef > 0"):
        load_config(GRPOConfig, None, ["kl_target=1.0", "kl_coef=0"])
    # Refused when the run starts (the loader checks each override alone, against the defaults).
    cfg = load_config(OnlineDPOConfig, None, ["rm_ensemble_penalty=0.5"])
    with pytest.raises(ConfigError, match="rm_ensemble_penalty=0.5 is only read with"):
        RewardGuards.from_config(cfg)


# --------------------------------------------------------------------------------------------------
# the score phase: ensemble -> clip -> anchor, placeholders untouched


def test_guards_apply_in_order_on_worked_numbers():
    members = torch.tensor(
        [
            [1.0, 2.0, 3.0],  # mean 2, pop. std sqrt(2/3) = 0.8165: 2 - 0.8165 = 1.1835 -> clip 1
            [-4.0, -2.0, 0.0],  # mean -2, std 1.6330: -3.6330 -> clip -1
            [0.2, 0.2, 0.2],  # std 0: 0.2, inside the clip
            [-10.0, -10.0, -10.0],  # the RM's placeholder (unreadable): no guard touches it
        ]
    )
    readable = torch.tensor([True, True, True, False])
    reference = torch.tensor([0.5, -0.5, 0.2, 0.0])
    scores, stats = guarded_scores(
        members, readable, objective="uncertainty", penalty=1.0, clip=1.0, reference=reference
    )
    want = [sigmoid(1.0 - 0.5), sigmoid(-1.0 + 0.5), 0.5, -10.0]
    assert scores.tolist() == pytest.approx(want, abs=1e-6)
    assert stats["reward_clipped_frac"] == pytest.approx(2 / 3)
    assert stats["rm_ensemble_std"] == pytest.approx((math.sqrt(2 / 3) + math.sqrt(8 / 3) + 0.0) / 3)
    assert stats["reward_anchor_mean"] == pytest.approx(sum(want[:3]) / 3)
    assert stats["reward_reference_mean"] == pytest.approx(0.2 / 3)
    # Clipping the heads before the ensemble would give row 1 [-1, -1, 0] -> -0.667 - 0.471 = -1.138
    # and sigmoid(-0.638) = 0.346, not sigmoid(-0.5) = 0.378: the order is ensemble first.
    assert scores[1].item() != pytest.approx(sigmoid(-1.138 + 0.5), abs=1e-3)
    # The stage's shaping comes after: online, an unreadable row still ranks below every closed one.
    shaped = group_scores(scores, readable, missing_eos_penalty=1.0)
    assert shaped[3].item() == pytest.approx(min(want[:3] + [0.0]) - 1.0)
    # Every guard off: the scores are the raw ones and nothing is reported.
    raw, none = guarded_scores(members[:, :1], readable)
    assert torch.equal(raw, members[:, 0]) and none == {}


def test_the_anchor_of_a_row_is_its_querys_reference_score():
    guards = RewardGuards(anchor=True, anchors=[0.0, 1.0, 2.0, 3.0])
    batch = SimpleNamespace(prompt_index=torch.tensor([0, 0, 1, 1]))  # 2 prompts x 2 samples
    members = torch.tensor([[3.0], [1.0], [2.0], [4.0]])
    scores, _ = guards.apply(members, torch.ones(4, dtype=torch.bool), [3, 1], batch)  # queries 3 and 1
    want = [sigmoid(3.0 - 3.0), sigmoid(1.0 - 3.0), sigmoid(2.0 - 1.0), sigmoid(4.0 - 1.0)]
    assert scores.tolist() == pytest.approx(want, abs=1e-6)


# --------------------------------------------------------------------------------------------------
# the adaptive KL coefficient reaches the loss


def _ppo_trainer(cfg, guards):
    from align.train.ppo import PPOTrainer

    accelerator = SimpleNamespace(
        gather=lambda x: x, process_index=0, num_processes=1, device=torch.device("cpu")
    )
    return PPOTrainer(
        cfg, accelerator, None, None, None, None, None, {}, None, None, None, None, None, None,
        torch.device("cpu"), RunningMoments(), None, guards=guards,
    )  # fmt: skip


def test_ppo_charges_the_controllers_kl_coefficient_not_kl_coef():
    from align.train.ppo import PPOTensors, advantages_phase

    cfg = PPOConfig(
        kl_coef=0.04, kl_target=1.0, kl_horizon=10, reward_norm="none", whiten_advantages=False, gamma=1.0,
        lam=1.0,
    )  # fmt: skip
    guards = RewardGuards.from_config(cfg)
    guards.kl.load_state_dict({"coef": 0.5})  # as a resumed run would have it
    ppo = _ppo_trainer(cfg, guards)
    mask = torch.ones(1, 3)
    t = PPOTensors(
        mask, torch.full((1, 3), -1.0), torch.full((1, 3), -2.0), torch.zeros(1, 3), torch.zeros(1, 3),
        torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([True]), torch.tensor([True]), {},
    )  # fmt: skip
    advantages_phase(ppo, t)
    # k1 KL = 1 per token, 3 in all; with values 0 and gamma = lam = 1 the first token's advantage is the
    # return: score 1 - 0.5 x 3 = -0.5 (kl_coef 0.04 would give 0.88).
    assert t.advantages[0, 0].item() == pytest.approx(-0.5)
    assert t.kl.sum().item() == pytest.approx(3.0)
    # After the iteration: the coefficient it used is logged, then KL 3 (over the target 1, clipped to
    # +20%) over 5 responses of a horizon of 10 moves it x1.1.
    assert adapt_kl(ppo, 3.0, 5) == {"kl_coef": 0.5}
    assert ppo.kl_coef == pytest.approx(0.55)
    assert adapt_kl(ppo, None, 5) == {"kl_coef": pytest.approx(0.55)}  # nothing measured: it stays
    assert ppo.kl_coef == pytest.approx(0.55)
    fixed = _ppo_trainer(PPOConfig(kl_coef=0.04), RewardGuards.from_config(PPOConfig(kl_coef=0.04)))
    assert adapt_kl(fixed, 3.0, 5) == {"kl_coef": 0.04} and fixed.kl_coef == 0.04


# --------------------------------------------------------------------------------------------------
# an ensemble reward model: K heads on one backbone


def _rollout(tokenizer, responses, finished):
    import chatml
    from align.rollout.batch import RolloutBatch

    prompt = chatml.encode_prompt([{"role": "user", "content": "hi"}], tokenizer)
    ids = torch.tensor(responses)
    return RolloutBatch(
        prompt_ids=[prompt] * len(responses), response_ids=ids, response_mask=torch.ones_like(ids),
        logprobs=None, finished=torch.tensor(finished), prompt_index=torch.arange(len(responses)),
        lengths=torch.full((len(responses),), ids.shape[1]), n=1, pad_id=tokenizer.pad_token_id,
    )  # fmt: skip


def test_an_ensemble_rm_scores_k_members_and_the_objective_is_the_pure_function(tiny_byte_dir, tmp_path):
    from transformers import AutoTokenizer

    import chatml
    from align.reward import RewardModel
    from align.train.rl_common import guard_scores, score_members, score_rollouts

    tokenizer = AutoTokenizer.from_pretrained(tiny_byte_dir)
    _, im_end = chatml.chatml_token_ids(tokenizer)
    rm = RewardModel.from_backbone(tiny_byte_dir, end_token_id=im_end, seed=0, num_heads=3).eval()
    batch = _rollout(tokenizer, [[72, 105, im_end], [65, 66, im_end], [72, 105, 105]], [True, True, False])
    texts = ["", "", ""]
    members, closed, readable = score_members(batch, texts, reward_model=rm)
    assert members.shape == (3, 3) and readable.tolist() == [True, True, False]
    assert members[2].tolist() == [rm.config.unclosed_reward] * 3
    assert len(set(members[0].tolist())) == 3  # three heads, three scores
    raw, _, _ = score_rollouts(batch, texts, reward_model=rm)  # one score for every other reader: the mean
    torch.testing.assert_close(raw, members.mean(dim=1))
    for objective, penalty in (("mean", 0.0), ("min", 0.0), ("uncertainty", 2.0)):
        guards = RewardGuards(objective=objective, penalty=penalty)
        guards.check_scorer(rm)
        scored = guard_scores(guards, batch, texts, [0, 1, 2], reward_model=rm)
        want = ensemble_reward(members, objective, penalty)
        torch.testing.assert_close(scored.scores[:2], want[:2])
        assert scored.scores[2].item() == rm.config.unclosed_reward  # the placeholder is no judgement
        assert scored.stats["rm_ensemble_std"] == pytest.approx(
            members[:2].std(1, unbiased=False).mean().item()
        )
    one = RewardModel.from_backbone(tiny_byte_dir, end_token_id=im_end, seed=0).eval()
    with pytest.raises(
        RunSetupError, match="rm_ensemble_objective=min needs a reward model of several heads"
    ):
        RewardGuards(objective="min").check_scorer(one)
    with pytest.raises(RunSetupError, match="a rule-based reward"):
        RewardGuards(objective="uncertainty").check_scorer(None)


# --------------------------------------------------------------------------------------------------
# the guards' run state in a checkpoint


def test_the_guards_state_survives_a_checkpoints_json():
    cfg = GRPOConfig(kl_target=0.5, kl_horizon=16, reward_anchor="reference")
    guards = RewardGuards.from_config(cfg)
    guards.anchors = [0.25, -1.5, 3.125]
    guards.kl.update(1.0, 16)  # 0.04 x 1.2
    saved = json.loads(json.dumps({"step": 3, **guards.state_dict()}))  # as trainer_state.json holds it
    restored = RewardGuards.from_config(cfg)
    restored.load_state_dict(saved)
    assert restored.anchors == [0.25, -1.5, 3.125] and restored.kl.coef == pytest.approx(0.048)
    # A checkpoint of a run started without anchors cannot be continued with them: the starting policy
    # that must give the reference answers is gone.
    with pytest.raises(RunSetupError, match="no reference scores"):
        RewardGuards.from_config(cfg).load_state_dict({"step": 3})
    assert RewardGuards.from_config(GRPOConfig()).state_dict() == {}


def test_reference_anchors_score_each_querys_greedy_answer_once(tmp_path):
    from contextlib import nullcontext

    from align.train.rl_common import reference_anchors

    asked = []

    class Engine:  # greedy answers "a<q>" to the prompts [q]
        def generate(self, prompts, n, max_new_tokens, temperature, top_p, seed):
            asked.append((prompts, n, temperature))
            texts = [f"a{p[0]}" for p in prompts]
            return SimpleNamespace(to=lambda device: SimpleNamespace(texts=lambda tokenizer: texts))

    cfg = GRPOConfig(batch_size=2, reward_clip=1.5, reward_anchor="reference")
    accelerator = SimpleNamespace(autocast=nullcontext, device="cpu", print=lambda *a: None)
    run = SimpleNamespace(
        cfg=cfg, accelerator=accelerator, prompt_ids=[[0], [1], [2]], engine=Engine(), tokenizer=None,
        is_main=True, out=tmp_path,
    )  # fmt: skip
    table = {"a0": (2.0, True), "a1": (9.0, False), "a2": (-1.0, True)}  # query 1's answer never closed

    def score(batch, texts, queries):
        members = torch.tensor([[table[t][0]] for t in texts])
        readable = torch.tensor([table[t][1] for t in texts])
        return members, readable.clone(), readable

    anchors = reference_anchors(run, RewardGuards.from_config(cfg), score)
    # Clipped to 1.5 like every score; the unreadable one takes the readable ones' mean (1.5 - 1) / 2.
    assert anchors == [1.5, 0.25, -1.0]
    assert asked == [([[0], [1]], 1, 0.0), ([[2]], 1, 0.0)]  # greedy, one answer per query, in batches
    lines = [json.loads(line) for line in (tmp_path / "reference_answers.jsonl").read_text().splitlines()]
    assert lines == [
        {"query": 0, "response": "a0", "score": 1.5},
        {"query": 1, "response": "a1", "score": None},
        {"query": 2, "response": "a2", "score": -1.0},
    ]
    table.update({"a0": (2.0, False), "a2": (0.0, False)})
    with pytest.raises(RunSetupError, match="no greedy reference answer closed"):
        reference_anchors(run, RewardGuards.from_config(cfg), score)


# --------------------------------------------------------------------------------------------------
# one query set


def test_the_default_query_sets_are_the_prompts_of_before():
    from align.tasks import generate_tasks, split_of_key

    def keys(tasks):
        return [t.key for t in tasks]

    for cfg, before in (
        (PPOConfig(), generate_tasks(64, seed=43, split="train")),  # max(4 x 16, 64), seed 42 + 1
        (PPOConfig(batch_size=8, seed=3), generate_tasks(128, seed=4, split="train")),
        (OnlineDPOConfig(), generate_tasks(24, seed=43, split="train")),  # its old embedded_prompts
        (GRPOConfig(), generate_tasks(8, seed=43, split="train")),
    ):
        prompts, tasks = load_prompts(cfg)
        assert keys(tasks) == keys(before) and prompts == [t.messages for t in before]
    # The keys choose the set, PPO and the online loops alike; None on an online stage is PPO's rule.
    _, a = load_prompts(PPOConfig(query_count=10, query_seed=7))
    _, b = load_prompts(GRPOConfig(query_count=10, query_seed=7))
    assert keys(a) == keys(b) == keys(generate_tasks(10, seed=7, split="train"))
    _, c = load_prompts(GRPOConfig(query_count=None, batch_size=5))
    assert len(c) == 80
    # No held-out problem is ever a query: the evaluations' tasks are another set of problems.
    heldout = {t.key for t in generate_tasks(200, seed=43, split="heldout")}
    assert all(split_of_key(k) == "train" for k in keys(a) + keys(c)) and not heldout & set(keys(c))


def test_query_kinds_keep_the_same_problems_of_those_kinds(tmp_path):
    from align.tasks import generate_tasks

    every = generate_tasks(90, seed=43, split="train")
    _, kept = load_prompts(PPOConfig(query_count=90, query_seed=43, query_kinds=["multiply", "add"]))
    # The same problems in the same order, filtered: the RM sampled on the 90 still saw every RL query.
    assert [t.key for t in kept] == [t.key for t in every if t.kind in ("multiply", "add")]
    assert len(kept) == 20 and {t.kind for t in kept} == {"multiply", "add"}
    _, one = load_prompts(GRPOConfig(query_count=9, query_seed=43, query_kinds=["reverse"]))
    assert [t.kind for t in one] == ["reverse"]
    with pytest.raises(ConfigError, match="none of the 2 queries of seed 43 is of these kinds"):
        kinds = [k for k in ("add", "reverse", "compare") if k not in {t.kind for t in every[:2]}]
        load_prompts(PPOConfig(query_count=2, query_seed=43, query_kinds=kinds[:1]))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    with pytest.raises(ConfigError, match="query_kinds filters the embedded queries"):
        PPOConfig(dataset=str(prompts), query_kinds=["add"])


# --------------------------------------------------------------------------------------------------
# end to end: GRPO with reward_clip, reward_anchor and kl_target, stopped after one iteration and resumed


def test_grpo_with_guards_logs_them_and_resumes_their_state(
    tiny_byte_dir, prompts_file, tmp_path, monkeypatch
):
    import align.train.online as online
    from align.rl_math import grpo_kl_term
    from align.tracking import read_metrics

    coefs, anchor_calls = [], []

    def kl_spy(logprobs, ref_logprobs, mask, kl_coef, n_tokens):
        coefs.append(kl_coef)
        return grpo_kl_term(logprobs, ref_logprobs, mask, kl_coef, n_tokens)

    def anchors_spy(*args):
        anchor_calls.append(1)
        return real_anchors(*args)

    real_anchors = online.reference_anchors
    monkeypatch.setattr(online, "grpo_kl_term", kl_spy)
    monkeypatch.setattr(online, "reference_anchors", anchors_spy)
    out = tmp_path / "grpo"
    target, horizon = 0.002, 16
    cfg = GRPOConfig(
        model_name_or_path=str(tiny_byte_dir), dataset=str(prompts_file), output_dir=str(out), batch_size=4,
        micro_batch_size=16, samples_per_query=4, max_new_tokens=6, max_steps=2, save_steps=1,
        learning_rate=3e-2, kl_coef=0.04, kl_target=target, kl_horizon=horizon, reward_clip=0.5,
        reward_anchor="reference", variance_order=False, report_to=["none"], progress=False, log_rollouts=0,
        eval_tasks=0,
    )  # fmt: skip
    assert online.run_grpo(cfg, reward_fn=ascii_reward, stop_after_step=1) == {"stopped_at": 1}
    online.run_grpo(cfg, reward_fn=ascii_reward)  # resumes at iteration 2
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    assert len(anchor_calls) == 1  # the resumed run read the anchors from the checkpoint

    def moved(coef, kl):
        return coef * (1 + min(max(kl / target - 1, -0.2), 0.2) * 16 / horizon)  # 4 queries x 4 samples

    assert records[0]["kl_coef"] == 0.04
    assert records[1]["kl_coef"] == pytest.approx(moved(0.04, records[0]["kl"]), rel=1e-9)
    assert records[1]["kl_coef"] != 0.04
    # The loss used the logged coefficient in each iteration (one micro-batch per iteration).
    assert coefs == pytest.approx([records[0]["kl_coef"], records[1]["kl_coef"]], rel=1e-12)
    state = json.loads((out / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert state["kl_controller"]["coef"] == pytest.approx(moved(records[1]["kl_coef"], records[1]["kl"]))
    references = [json.loads(line) for line in (out / "reference_answers.jsonl").read_text().splitlines()]
    assert [r["query"] for r in references] == list(range(16))
    # A rule reads any text: every reference answer is scored, and clipped like every score.
    assert state["reward_anchors"] == [r["score"] for r in references]
    assert all(0.0 <= a <= 0.5 for a in state["reward_anchors"])
    for record in records:
        assert 0.0 <= record["reward_clipped_frac"] <= 1.0
        assert 0.0 < record["reward_anchor_mean"] < 1.0  # sigmoids


def test_a_run_resumed_on_other_query_kinds_is_refused(tiny_byte_dir, tmp_path):
    """The checkpoint is tied to its prompts: resuming with another query_kinds (another query set) stops
    with a reason instead of continuing on prompts the saved run never saw."""
    import align.train.online as online

    def cfg(kinds):
        return GRPOConfig(
            model_name_or_path=str(tiny_byte_dir), output_dir=str(tmp_path / "grpo"), query_count=18,
            query_seed=43, query_kinds=kinds, batch_size=2, micro_batch_size=8, samples_per_query=2,
            max_new_tokens=4, max_steps=2, save_steps=1, report_to=["none"], progress=False, log_rollouts=0,
            eval_tasks=0,
        )  # fmt: skip

    assert online.run_grpo(cfg(["add", "multiply"]), reward_fn=ascii_reward, stop_after_step=1) == {
        "stopped_at": 1
    }
    with pytest.raises(RunSetupError, match="was trained on different data"):
        online.run_grpo(cfg(["add"]), reward_fn=ascii_reward)
