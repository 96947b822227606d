"""Rejection-sampled preference pairs (Qwen2, section 4.1.2): sample responses from a policy, label them with
a reward source, and pair the good with the bad.

    python recipes/sample_pairs.py --config recipes/configs/sample_pairs/embedded.yaml [key=value ...]

Flow, one prompt at a time (records are appended and flushed as each prompt is done, so a run that stops
keeps everything before the prompt that stopped it):

1. prompts: a JSONL prompt file (``{"messages": [...]}`` or ``{"prompt": "..."}``, optional ``tools``; any
   other fields are the user's, handed to their checker), or ``embedded``: generated tasks
   (``align.tasks.generate_tasks``);
2. ``samples_per_query`` responses per prompt from the policy, through the RL rollout engines
   (``rollout_engine``), the prompt rendered with the chat template and ``default_system`` as RL does;
3. labels from the reward source (``reward``):

   * ``verifier``: the embedded tasks' gold verifier (``align.tasks.verify``); a prompt file must then hold
     task records (``align.tasks.write_tasks_jsonl``);
   * ``checker``: the user's function ``module:function``, imported by name (``importlib``), called as
     ``fn(record, response) -> bool | float`` where ``record`` is the prompt file's JSON object for that
     line (an embedded task: ``Task.to_dict()``) and ``response`` the decoded reply text; ``True`` or a
     number >= ``pass_threshold`` marks it correct. Anything else it returns, or any exception, stops the
     run with the prompt's ``file:line`` and the checker's message;
   * ``model``: a reward model directory (``recipes/rm.py``'s output); responses are ranked by score;

4. pairs per prompt, over the *distinct* responses (duplicates merged by text with surrounding whitespace
   stripped; the label is read once per distinct response, on its first spelling):

   * verifier / checker: every (correct, incorrect) combination. The source's reference reply (an embedded
     task's canonical answer; a prompt file's ``reference_field``) joins as one more candidate, first in
     line, labelled like the samples (a reference the checker rejects is dropped and counted). A response
     that never closed (cut by ``max_new_tokens``) is never chosen while ``unclosed_incorrect``;
   * model: every two readable responses whose scores differ by at least ``score_margin`` (and strictly),
     largest difference first, so a cap of 1 is the best-vs-worst pair; responses the RM cannot read (no
     end token) are left out; the reference is scored like a sample;
   * at most ``max_pairs_per_prompt``, taken in the order of `correct_incorrect_pairs` / `score_pairs`.

Outputs in ``output_dir``: ``pairs.jsonl`` (the pair format ``recipes/rm.py`` and ``recipes/dpo.py`` read,
plus ``group``), ``samples.jsonl`` (every sample and its label, to recompute the pairs), ``report.json`` and
``report.md`` (prompts, samples, share correct, pairs per prompt, prompts with no pair).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

import chatml
from align.config import SamplingKeys, doc
from align.config_loader import ConfigError, config_to_dict
from align.data import DataError, iter_jsonl_values, load_prompt_file
from align.data.pairing import (
    Candidate,
    checker_value,
    import_checker,
    merge_candidates,
    scored_pairs,
    verified_pairs,
)

# --------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SamplePairsConfig(SamplingKeys):
    """Rejection-sampled preference pairs: n samples per prompt from a policy, labelled by the embedded
    verifier, a user's `module:function` checker or a reward model, paired correct vs incorrect (or by
    score), written as preference JSONL with a data report. The sampling keys are the RL stages' own
    (align.config.SamplingKeys); the pairs hold the prompts as given (training inserts the same default
    system prompt)."""

    model_name_or_path: str = doc(
        "auto",
        "The policy to sample from: a local directory, `smollm2-135m-instruct`, or `auto` = outputs/sft/final "
        "if it exists, else smollm2-135m-instruct.",
    )
    dataset: str = doc(
        "embedded",
        "Prompts: a JSONL file of {messages} or {prompt} (optional tools; other fields are passed to the "
        "checker), or `embedded` (generated tasks).",
    )
    embedded_prompts: int = doc(64, "With dataset=embedded: how many generated tasks.")
    embedded_split: Literal["train", "heldout"] = doc(
        "train", "With dataset=embedded: the task split (heldout: problems no embedded training stage sees)."
    )
    embedded_seed: int = doc(
        43, "With dataset=embedded: generate_tasks seed (43: the tasks PPO's embedded default trains on)."
    )
    reward: Literal["verifier", "checker", "model"] = doc(
        "verifier",
        "Labels: verifier = the embedded tasks' gold verifier (a file must hold task records); checker = "
        "the `checker` function; model = the reward model at reward_model_path (pairs by score).",
    )
    checker: str | None = doc(
        None,
        "With reward=checker: `module:function`, imported by name, called fn(record, response) -> bool | "
        "float (record: the prompt's JSON object; an embedded task's Task.to_dict()).",
    )
    reward_model_path: str | None = doc(None, "With reward=model: a reward model directory (recipes/rm.py).")
    pass_threshold: float = doc(
        1.0, "A checker's number at or above this marks a response correct (True counts 1, False 0)."
    )
    score_margin: float = doc(
        0.0, "With reward=model: the least score difference that makes a pair (pairs need a strict win)."
    )
    reference: bool = doc(
        True,
        "Add the source's reference reply as a candidate (embedded tasks: the canonical answer; a prompt "
        "file: its `reference_field`).",
    )
    reference_field: str = doc(
        "reference", "The prompt record's field holding a reference reply (a string), where it has one."
    )
    unclosed_incorrect: bool = doc(
        True,
        "A response that never closed (cut by max_new_tokens) is labelled incorrect whatever the checker "
        "says: as chosen it would teach a preference for unfinished replies.",
    )
    max_pairs_per_prompt: int | None = doc(8, "Most pairs kept per prompt (none: no cap).")
    samples_per_query: int = doc(8, "Responses sampled per prompt.")
    batch_size: int = doc(
        64,
        "Sequences per engine call and reward-model pass: batch_size // samples_per_query prompts at a "
        "time (at least one).",
    )
    device: str | None = doc(None, "cpu, cuda, ...; default: cuda when available, else cpu.")
    output_dir: str = doc("outputs/sample_pairs", "Where pairs.jsonl, samples.jsonl and the report go.")
    overwrite: bool = doc(False, "Allow an output_dir that already holds files this tool did not write.")
    seed: int = doc(42, "Sampling seed: the k-th engine call samples with seed + k.")
    progress: bool = doc(True, "Show a progress bar over prompts.")


# --------------------------------------------------------------------------------------------------------
# Set-up (the pure pairing pieces are in align.data.pairing)
# --------------------------------------------------------------------------------------------------------


def check_config(cfg: SamplePairsConfig) -> None:
    """Refuse, before any model is loaded, settings that cannot work together."""
    if cfg.reward == "checker" and not cfg.checker:
        raise ConfigError("reward=checker needs checker=module:function")
    if cfg.reward != "checker" and cfg.checker:
        raise ConfigError(f"checker={cfg.checker} is only read with reward=checker (reward={cfg.reward})")
    if cfg.reward == "model" and not cfg.reward_model_path:
        raise ConfigError("reward=model needs reward_model_path")
    if cfg.reward != "model" and cfg.reward_model_path:
        raise ConfigError(f"reward_model_path is only read with reward=model (reward={cfg.reward})")
    if cfg.reward_model_path and not Path(cfg.reward_model_path).is_dir():
        raise ConfigError(f"reward_model_path: {cfg.reward_model_path} is not a directory")
    for key in ("samples_per_query", "max_new_tokens", "batch_size", "embedded_prompts", "max_length"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.max_pairs_per_prompt is not None and cfg.max_pairs_per_prompt < 1:
        raise ConfigError(f"max_pairs_per_prompt must be >= 1 or none, got {cfg.max_pairs_per_prompt}")


# --------------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PromptItem:
    """One prompt: its conversation, the record the checker sees, where it came from (`file:line` or
    `embedded:<split>:seed<seed>:<i>`), its reference reply and, for the verifier, its task."""

    messages: list[dict[str, Any]]
    record: dict[str, Any]
    where: str
    reference: str | None
    task: Any = None


def load_items(cfg: SamplePairsConfig) -> list[PromptItem]:
    """The prompts, each checked (shape, reference, task fields) with `file:line` errors before sampling."""
    from align.tasks import Task, generate_tasks

    if cfg.dataset == "embedded":
        tasks = generate_tasks(cfg.embedded_prompts, seed=cfg.embedded_seed, split=cfg.embedded_split)
        return [
            PromptItem(
                [dict(m) for m in t.messages],
                t.to_dict(),
                f"embedded:{cfg.embedded_split}:seed{cfg.embedded_seed}:{i}",
                t.answer if cfg.reference else None,
                t,
            )
            for i, t in enumerate(tasks)
        ]
    path = Path(cfg.dataset)
    if not path.is_file():
        raise DataError(f"{cfg.dataset}: no such prompt file")
    conversations = load_prompt_file(path)  # shape errors as file:line
    items = []
    for (line, record), messages in zip(iter_jsonl_values(path), conversations, strict=True):
        where = f"{path}:{line}"
        task = None
        reference = record.get(cfg.reference_field) if cfg.reference else None
        if cfg.reward == "verifier":
            try:
                task = Task.from_json(record)
            except (KeyError, TypeError, ValueError) as err:
                raise DataError(
                    f"{where}: reward=verifier needs task records (kind, messages, answer, match, key; "
                    f"align.tasks.write_tasks_jsonl), this one lacks {err}"
                ) from None
            reference = task.answer if cfg.reference else None
        if reference is not None and not isinstance(reference, str):
            raise DataError(
                f"{where}: '{cfg.reference_field}' must be a string (a reference reply), "
                f"found {type(reference).__name__}"
            )
        items.append(PromptItem(messages, record, where, reference, task))
    return items


# --------------------------------------------------------------------------------------------------------
# Labelling one prompt
# --------------------------------------------------------------------------------------------------------


class Labeller:
    """Labels one prompt's candidates with the configured reward source."""

    def __init__(self, cfg: SamplePairsConfig, checker: Callable[[Any, str], Any] | None) -> None:
        self.cfg, self.checker = cfg, checker

    def label(self, item: PromptItem, cands: list[Candidate]) -> None:
        """Set `value` and `correct` on every candidate (verifier/checker); stop with `file:line` and the
        checker's message on an exception or a result that is not a number."""
        from align.tasks import verify

        cfg = self.cfg
        for c in cands:
            if self.checker is None:
                c.value = float(verify(item.task, c.text))
            else:
                shown = f"(response {c.text[:80]!r})"
                try:
                    result = self.checker(item.record, c.text)
                except Exception as err:  # the user's code: any failure stops the run, located and named
                    raise DataError(
                        f"{item.where}: checker {cfg.checker} raised {type(err).__name__}: {err} {shown}"
                    ) from err
                try:
                    c.value = checker_value(result)
                except ValueError as err:
                    raise DataError(f"{item.where}: checker {cfg.checker} {err} {shown}") from None
            c.correct = c.value >= cfg.pass_threshold and (c.closed or not cfg.unclosed_incorrect)


# --------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------


def _reference_batch(prompt_ids: list[list[int]], texts: list[str], tokenizer: Any, pad_id: int) -> Any:
    """Reference replies as closed responses (reply tokens + <|im_end|>), for the reward model to score."""
    from align.rollout.batch import RolloutBatch

    _, im_end = chatml.chatml_token_ids(tokenizer)
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] + [im_end] for t in texts]
    return RolloutBatch.from_responses(prompt_ids, rows, [True] * len(rows), pad_id)


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


class Tally:
    """What the report counts, updated prompt by prompt."""

    def __init__(self) -> None:
        self.prompts = self.samples = self.distinct = self.unclosed = self.correct = 0
        self.pairs_per_prompt: list[int] = []
        self.with_reference = self.references_rejected = 0
        self.all_correct = self.none_correct = 0
        self.scores: list[float] = []

    def add(
        self,
        cands: list[Candidate],
        pairs: list[tuple[Candidate, Candidate]],
        closed: list[bool],
        scores: list[float],
    ) -> None:
        """One prompt: its candidates, pairs, each sample's closed flag and the readable samples' scores."""
        n = len(closed)
        self.prompts += 1
        self.samples += n
        self.unclosed += n - sum(closed)
        self.distinct += sum(1 for c in cands if c.samples)
        correct = sum(c.samples for c in cands if c.correct)
        self.correct += correct
        self.all_correct += correct == n
        self.none_correct += correct == 0
        self.pairs_per_prompt.append(len(pairs))
        self.with_reference += sum(1 for chosen, _ in pairs if chosen.is_reference)
        self.references_rejected += sum(1 for c in cands if c.is_reference and c.correct is False)
        self.scores += scores


def _report(cfg: SamplePairsConfig, tally: Tally, total: int, seconds: float, stopped: dict | None) -> dict:
    from align.evaluation.policy import portable_path

    out = Path(cfg.output_dir)
    per = tally.pairs_per_prompt
    labelled = cfg.reward != "model"
    return {
        "policy": portable_path(cfg.model_name_or_path, out),
        "dataset": portable_path(cfg.dataset, out),
        "reward": cfg.reward if cfg.reward != "checker" else f"checker {cfg.checker}",
        "reward_model": portable_path(cfg.reward_model_path, out) if cfg.reward_model_path else None,
        "prompts": tally.prompts,
        "prompts_total": total,
        "samples_per_query": cfg.samples_per_query,
        "samples": tally.samples,
        "distinct_responses": tally.distinct,
        "unclosed_share": tally.unclosed / tally.samples if tally.samples else None,
        "share_correct": tally.correct / tally.samples if labelled and tally.samples else None,
        "prompts_all_correct": tally.all_correct if labelled else None,
        "prompts_none_correct": tally.none_correct if labelled else None,
        "mean_score": sum(tally.scores) / len(tally.scores) if tally.scores else None,
        "pairs": sum(per),
        "pairs_per_prompt": {
            "mean": sum(per) / len(per) if per else None,
            "min": min(per, default=None),
            "max": max(per, default=None),
            "histogram": {str(k): v for k, v in sorted(Counter(per).items())},
        },
        "prompts_without_pair": sum(1 for p in per if p == 0),
        "pairs_with_reference_chosen": tally.with_reference,
        "references_rejected": tally.references_rejected,
        "max_pairs_per_prompt": cfg.max_pairs_per_prompt,
        "seconds": round(seconds, 1),
        "stopped": stopped,
    }


def _dash(x: Any) -> str:
    return "-" if x is None else str(x)


def format_report(r: dict[str, Any]) -> str:
    """The short Markdown data report."""

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    per = r["pairs_per_prompt"]
    lines = [
        "# Sampled preference pairs",
        "",
        f"Policy `{r['policy']}`, prompts `{r['dataset']}`, labels: {r['reward']}.",
        "",
        "| | |",
        "|---|---|",
        f"| prompts | {r['prompts']} of {r['prompts_total']} |",
        f"| samples | {r['samples']} ({r['samples_per_query']} per prompt), {r['distinct_responses']} distinct |",
        f"| share correct | {pct(r['share_correct'])} |",
        f"| never closed | {pct(r['unclosed_share'])} |",
        f"| prompts all correct / none correct | {_dash(r['prompts_all_correct'])} / "
        f"{_dash(r['prompts_none_correct'])} |",
        f"| mean RM score | {'-' if r['mean_score'] is None else format(r['mean_score'], '.3f')} |",
        f"| pairs | {r['pairs']} (reference chosen in {r['pairs_with_reference_chosen']}) |",
        f"| pairs per prompt | mean {'-' if per['mean'] is None else format(per['mean'], '.2f')}, "
        f"min {per['min']}, max {per['max']} (cap {r['max_pairs_per_prompt']}) |",
        f"| prompts with no pair | {r['prompts_without_pair']} |",
        f"| references labelled incorrect (dropped) | {r['references_rejected']} |",
    ]
    if r["stopped"]:
        lines += ["", f"**Stopped** at {r['stopped']['where']}: {r['stopped']['error']}"]
    return "\n".join(lines) + "\n"


def _write_report(out: Path, report: dict[str, Any]) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(format_report(report))


def _score_chunk(
    reward_model: Any,
    batch: Any,
    texts: list[str],
    chunk: list[PromptItem],
    ids: list[list[int]],
    tokenizer: Any,
    pad_id: int,
    micro_batch_size: int,
) -> tuple[list[float], list[bool], dict[int, float | None]]:
    """Reward-model scores of a chunk's samples, which ones the RM could read, and each reference's score
    (by position in the chunk; None where unreadable)."""
    from align.train.rl_common import score_rollouts

    raw, closed, _ = score_rollouts(
        batch, texts, reward_model=reward_model, micro_batch_size=micro_batch_size
    )
    refs = [(k, it.reference) for k, it in enumerate(chunk) if it.reference is not None]
    ref_scores: dict[int, float | None] = {}
    if refs:
        ref_batch = _reference_batch([ids[k] for k, _ in refs], [r for _, r in refs], tokenizer, pad_id)
        texts_ref = [r for _, r in refs]  # score_rollouts counts rows by its texts
        ref_raw, ok, _ = score_rollouts(
            ref_batch.to(batch.response_ids.device), texts_ref, reward_model=reward_model
        )
        for (k, _), score, good in zip(refs, ref_raw.tolist(), ok.tolist(), strict=True):
            ref_scores[k] = score if good else None
    return raw.tolist(), closed.tolist(), ref_scores


def prompt_pairs(
    cfg: SamplePairsConfig,
    labeller: Labeller,
    item: PromptItem,
    texts: list[str],
    closed: list[bool],
    scores: list[float] | None = None,
    reference_score: float | None = None,
) -> tuple[list[Candidate], list[int], list[tuple[Candidate, Candidate]]]:
    """One prompt's candidates, each sample's candidate index, and its (chosen, rejected) pairs: labelled by
    the verifier/checker when `scores` is None, else ranked by these reward-model scores (a candidate takes
    the score of its first readable sample; the reference takes `reference_score`)."""
    cands, which = merge_candidates(texts, closed, item.reference)
    if scores is None:
        labeller.label(item, cands)
        return cands, which, verified_pairs(cands, cfg.max_pairs_per_prompt)
    for c in cands:
        if c.is_reference:
            c.score = reference_score
    for ok, score, w in zip(closed, scores, which, strict=True):
        if ok and cands[w].score is None and not cands[w].is_reference:
            cands[w].score = score
    return cands, which, scored_pairs(cands, cfg.score_margin, cfg.max_pairs_per_prompt)


def pair_record(item: PromptItem, group: int, chosen: Candidate, rejected: Candidate) -> dict[str, Any]:
    """One line of pairs.jsonl: the `pair` preference format plus where it came from."""
    record: dict[str, Any] = {
        "prompt": list(item.messages),
        "chosen": _assistant(chosen.text),
        "rejected": _assistant(rejected.text),
        "group": group,
        "source": item.where,
        "chosen_is_reference": chosen.is_reference,
    }
    if chosen.score is not None:
        record["chosen_score"], record["rejected_score"] = chosen.score, rejected.score
    if getattr(item.messages, "tools", None):
        record["tools"] = item.messages.tools
    return record


def _jsonl_line(fh: Any, record: dict[str, Any]) -> None:
    fh.write(json.dumps(record, ensure_ascii=False) + "\n")


def run_sample_pairs(cfg: SamplePairsConfig) -> dict[str, Any]:
    """Sample, label, pair and write (see the module docstring); returns the report."""
    from align.assets import resolve_model, start_model
    from align.evaluation.policy import load_lm
    from align.models import load_tokenizer
    from align.rollout.engines import engine_class, engine_options
    from align.train.process import prepare_output_dir
    from align.train.rl_common import rl_default_system

    check_config(cfg)
    checker = import_checker(cfg.checker) if cfg.reward == "checker" else None  # before any sampling
    items = load_items(cfg)
    out = prepare_output_dir(cfg.output_dir, overwrite=cfg.overwrite, is_main=True, stage="sample_pairs")
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    policy_dir = resolve_model(start_model(cfg.model_name_or_path))
    tokenizer = load_tokenizer(policy_dir)
    reward_model = None
    if cfg.reward == "model":
        from align.reward import RewardModel
        from align.train.rl_common import check_same_vocabulary

        check_same_vocabulary(tokenizer, cfg.reward_model_path)
        reward_model = RewardModel.from_pretrained(cfg.reward_model_path, dtype=torch.float32)
        reward_model.requires_grad_(False)
        reward_model = reward_model.eval().to(device)
    # With a reward model, the system prompt it was trained with (and its end token checked).
    system = rl_default_system(cfg, reward_model, tokenizer)
    prompt_ids = []
    for item in items:
        ids = chatml.encode_prompt(item.messages, tokenizer, default_system=system)
        if len(ids) > cfg.max_length:
            raise DataError(
                f"{item.where}: the prompt is {len(ids)} tokens, over max_length={cfg.max_length}"
            )
        prompt_ids.append(ids)
    engine = engine_class(cfg.rollout_engine)(
        load_lm(policy_dir, device),
        tokenizer,
        batch_size=cfg.batch_size,
        logprobs="none",
        **engine_options(cfg),
    )
    (out / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n")
    labeller, tally, t0, n = Labeller(cfg, checker), Tally(), time.perf_counter(), cfg.samples_per_query
    per_call = max(1, cfg.batch_size // n)
    bar = tqdm(total=len(items), desc="sample_pairs", unit="prompt", disable=not cfg.progress)
    try:
        with (out / "pairs.jsonl").open("w") as pairs_fh, (out / "samples.jsonl").open("w") as samples_fh:
            for call, start in enumerate(range(0, len(items), per_call)):
                chunk, ids = items[start : start + per_call], prompt_ids[start : start + per_call]
                batch = engine.generate(
                    ids, n=n, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                    top_p=cfg.top_p, seed=cfg.seed + call,
                )  # fmt: skip
                texts, finished = batch.texts(tokenizer), batch.finished.tolist()
                scores, closed, ref_scores = None, finished, {}
                if reward_model is not None:
                    scores, closed, ref_scores = _score_chunk(
                        reward_model, batch, texts, chunk, ids, tokenizer, engine.pad_id, cfg.batch_size
                    )
                for k, item in enumerate(chunk):
                    rows = range(k * n, (k + 1) * n)  # prompt k's samples (RolloutBatch groups them)
                    row_scores = [scores[r] for r in rows] if scores is not None else None
                    row_closed = [closed[r] for r in rows]
                    cands, which, pairs = prompt_pairs(
                        cfg,
                        labeller,
                        item,
                        [texts[r] for r in rows],
                        row_closed,
                        row_scores,
                        ref_scores.get(k),
                    )
                    for chosen, rejected in pairs:
                        _jsonl_line(pairs_fh, pair_record(item, start + k, chosen, rejected))
                    _jsonl_line(
                        samples_fh,
                        _sample_record(item, start + k, rows, texts, finished, closed, scores, cands, which),
                    )
                    pairs_fh.flush()  # a run stopped later keeps this prompt's records
                    samples_fh.flush()
                    readable = [s for s, ok in zip(row_scores or [], row_closed, strict=False) if ok]
                    tally.add(cands, pairs, row_closed, readable)
                    bar.update(1)
    except BaseException as err:
        # Whatever stopped the run, the report says what was done; the records written so far stay.
        stopped = {"where": items[min(tally.prompts, len(items) - 1)].where, "error": str(err) or repr(err)}
        _write_report(out, _report(cfg, tally, len(items), time.perf_counter() - t0, stopped))
        raise
    finally:
        bar.close()
    report = _report(cfg, tally, len(items), time.perf_counter() - t0, None)
    _write_report(out, report)
    print(format_report(report) + f"\npairs: {out / 'pairs.jsonl'}\nreport: {out / 'report.md'}")
    return report


def _sample_record(
    item: PromptItem,
    group: int,
    rows: range,
    texts: list[str],
    finished: list[bool],
    closed: list[bool],
    scores: list[float] | None,
    cands: list[Candidate],
    which: list[int],
) -> dict[str, Any]:
    """One line of samples.jsonl: a prompt's samples in order, with what labelled them."""
    record: dict[str, Any] = {
        "group": group,
        "source": item.where,
        "reference": item.reference,
        "samples": [texts[r] for r in rows],
        "finished": [finished[r] for r in rows],
        "candidate": which,
    }
    if scores is None:
        record["values"] = [cands[w].value for w in which]
        record["correct"] = [cands[w].correct for w in which]
        ref = cands[0] if cands and cands[0].is_reference else None
        record["reference_correct"] = ref.correct if ref is not None else None
    else:
        record["scores"] = [scores[r] for r in rows]
        record["readable"] = [closed[r] for r in rows]  # the RM found the end token: the score is a judgement
        record["candidate_scores"] = [c.score for c in cands]
    return record
