"""Sharded training (FSDP2, align/train/sharding.py) on 2 CPU processes (gloo, torchrun) against one
process: the same losses and final weights for the same seed and global batch, a sharded checkpoint that
resumes on 2 processes bit for bit and on 1 process to float rounding (an RL run's: on 2 bit for bit, on 1
refused), a `final/` that plain `from_pretrained` loads (SFT, DPO and the reward model), and per-rank bytes of parameters + gradients + AdamW state about halved.

Every launch gets a 60-second process-group timeout (ALIGN_PG_TIMEOUT_S) and a subprocess timeout, so a
hang fails instead of blocking. Launches are shared between assertions (module-scoped fixtures)."""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ascii_reward, build_tiny_qwen2, byte_tokenizer
from safetensors.torch import load_file

from align.config import DPOConfig, GRPOConfig, OnlineDPOConfig, PPOConfig, RMConfig, SFTConfig
from align.tasks import generate_tasks, preference_pairs, write_jsonl, write_sft_jsonl
from align.tracking import read_metrics
from align.train.dpo import run_dpo
from align.train.process import RunSetupError, make_accelerator
from align.train.reward import run_reward
from align.train.sft import run_sft

ROOT = Path(__file__).resolve().parents[1]
SFT_ARGS = dict(
    max_steps=4, save_steps=2, batch_size=8, micro_batch_size=2, max_length=512, eval_tasks=0,
    learning_rate=3e-3, dtype="float32",
)  # fmt: skip
RM_ARGS = dict(
    stage="rm", max_steps=3, batch_size=8, micro_batch_size=2, max_length=512, learning_rate=2e-3,
    eval_micro_batch_size=4, dtype="float32",
)  # fmt: skip
DPO_ARGS = dict(
    max_steps=3, batch_size=8, micro_batch_size=2, max_length=512, eval_tasks=0, learning_rate=1e-3,
    rpo_alpha=0.5, dtype="float32",
)  # fmt: skip


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(recipe: str, args: dict, out: Path) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 recipes/<recipe> sharding=fsdp ...`, asserted to have run as 2."""
    env = {
        **os.environ, "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
        "ALIGN_PG_TIMEOUT_S": "60",
    }  # fmt: skip
    keys = [f"{k}={v}" for k, v in args.items()]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
         f"recipes/{recipe}", *keys, "sharding=fsdp", "report_to=none", "progress=false", f"output_dir={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "x 2 process(es)" in proc.stdout  # really two processes
    return proc


def _one(args: dict, out: Path) -> dict:
    return {**args, "report_to": ["none"], "progress": False, "output_dir": str(out)}


def _column(out: Path, key: str = "loss") -> list[float]:
    return [row[key] for row in read_metrics(out)]


def _assert_same_weights(a_dir: Path, b_dir: Path, atol: float) -> None:
    a, b = load_file(a_dir / "final" / "model.safetensors"), load_file(b_dir / "final" / "model.safetensors")
    assert set(a) == set(b)  # a tied head is written once by both
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=atol, rtol=0, msg=name)


def _total_bytes(out: Path) -> list[int]:
    return [rank["total"] for rank in json.loads((out / "memory.json").read_text())["ranks"]]


@pytest.fixture(scope="module")
def byte_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny Qwen2 models over the byte tokenizer, untied and tied embeddings."""
    root = tmp_path_factory.mktemp("byte-models")
    return {
        tie: build_tiny_qwen2(byte_tokenizer(), root / tie, tie_word_embeddings=tie == "tied")
        for tie in ("untied", "tied")
    }


@pytest.fixture(scope="module")
def sft_runs(byte_models, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Per tie: SFT sharded on 2 processes and on 1 process unsharded, 4 steps, checkpoints at 2 and 4."""
    root = tmp_path_factory.mktemp("sft-runs")
    data = write_sft_jsonl(root / "d.jsonl", 64, seed=3)
    runs = {}
    for tie, model in byte_models.items():
        args = {**SFT_ARGS, "model_name_or_path": str(model), "dataset": str(data)}
        torchrun("sft.py", args, root / f"{tie}-two")
        run_sft(SFTConfig(**_one(args, root / f"{tie}-one")))
        runs[tie] = {"two": root / f"{tie}-two", "one": root / f"{tie}-one", "args": args}
    return runs


@pytest.mark.parametrize("tie", ["untied", "tied"])
def test_sft_sharded_on_two_gives_the_losses_and_weights_of_one(sft_runs, tie):
    two, one = sft_runs[tie]["two"], sft_runs[tie]["one"]
    assert _column(two) == pytest.approx(_column(one), abs=1e-5)
    _assert_same_weights(one, two, atol=1e-5)
    ckpt = two / "checkpoints" / "step-4"
    assert (ckpt / "dcp" / ".metadata").is_file()
    assert {p.name for p in ckpt.glob("rng-rank*.pt")} == {"rng-rank0.pt", "rng-rank1.pt"}
    assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 2


@pytest.mark.parametrize("tie", ["untied", "tied"])
def test_final_of_a_sharded_run_loads_with_plain_from_pretrained(sft_runs, tie):
    from transformers import AutoModelForCausalLM

    final = sft_runs[tie]["two"] / "final"
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    saved = load_file(final / "model.safetensors")
    state = model.state_dict()
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name
    assert json.loads((final / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (tie == "tied") and ("lm_head.weight" in saved) == (tie == "untied")


@pytest.mark.parametrize("tie", ["untied", "tied"])
def test_sharded_bytes_per_rank_are_about_half_of_one_process(sft_runs, tie):
    """Parameters + gradients + AdamW moments per rank, as logged at set-up (memory.json)."""
    (one,) = _total_bytes(sft_runs[tie]["one"])
    two = _total_bytes(sft_runs[tie]["two"])
    assert len(two) == 2 and max(two) <= 0.55 * one
    assert sum(two) >= one  # every byte is held somewhere (the shards pad a little)


@pytest.mark.parametrize("tie", ["untied", "tied"])
def test_planned_memory_is_what_the_sharded_processes_measured(sft_runs, byte_models, tie):
    """`planned_memory` (from the parameter shapes alone, what bench/memory.py reports for 8 or 64 ranks)
    gives byte for byte what each of the 2 sharded SFT processes and the 1 unsharded process measured on
    their own tensors (memory.json), on a model whose 259-word vocabulary does not split evenly."""
    from transformers import AutoModelForCausalLM

    from align.train.sharding import planned_memory

    model = AutoModelForCausalLM.from_pretrained(byte_models[tie], dtype=torch.float32)
    assert model.get_input_embeddings().weight.shape[0] % 2 == 1  # the two shards differ
    for run, world, accumulation in (("two", 2, 2), ("one", 1, 4)):
        measured = json.loads((sft_runs[tie][run] / "memory.json").read_text())["ranks"]
        assert planned_memory(model, world, accumulation) == measured, run
    assert len({r["params"] for r in planned_memory(model, 2)}) == 2


def test_the_memory_bench_reports_1_2_and_8_ranks(tmp_path):
    """bench/memory.py, shapes only (no launch): Qwen2.5-7B's parameter count as published (7.62B), every
    byte held by exactly one rank at each rank count, the largest rank at most 0.55x of one process with 2
    ranks and about 1/8 with 8 (the 152,064 x 3,584 embedding splits evenly; the norms' 3,584 too)."""
    from bench import memory

    record = memory.main(
        [
            "--models",
            "tiny,qwen2.5-7b",
            "--ranks",
            "1,2,8",
            "--measure",
            "",
            "--out",
            str(tmp_path / "m.json"),
        ]
    )
    assert json.loads((tmp_path / "m.json").read_text())["models"].keys() == {"tiny", "qwen2.5-7b"}
    seven = record["models"]["qwen2.5-7b"]
    assert seven["parameters"] == 7_615_616_512 and not seven["tied_embeddings"]
    one = seven["ranks"]["1"]["largest_total"]
    assert one == 16 * seven["parameters"]  # fp32 weights, gradients and two moments
    for world in ("2", "8"):
        rows = seven["ranks"][world]["per_rank"]
        assert len(rows) == int(world) and sum(r["total"] for r in rows) == one
    assert seven["ranks"]["2"]["largest_over_one_process"] <= 0.55
    assert seven["ranks"]["8"]["largest_over_one_process"] == pytest.approx(1 / 8, abs=1e-3)


def test_sharded_checkpoint_resumes_on_two_bit_exact_and_on_one(sft_runs, tmp_path):
    """The step-2 checkpoint of the 2-process run, as a kill after step 2 would leave it: resumed on 2
    processes it continues the uninterrupted loss curve and weights bit for bit; read by 1 unsharded
    process (resharded from the DCP shards) it continues them to float rounding."""
    run = sft_runs["untied"]
    for name in ("resume-two", "resume-one"):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        shutil.copy(run["two"] / ".align-run.json", tmp_path / name)
        shutil.copytree(run["two"] / "checkpoints" / "step-2", tmp_path / name / "checkpoints" / "step-2")
    torchrun("sft.py", run["args"], tmp_path / "resume-two")
    run_sft(SFTConfig(**_one(run["args"], tmp_path / "resume-one")))
    uninterrupted = _column(run["two"])[2:]
    assert _column(tmp_path / "resume-two") == uninterrupted  # bit-exact
    assert _column(tmp_path / "resume-one") == pytest.approx(uninterrupted, abs=1e-6)
    _assert_same_weights(run["two"], tmp_path / "resume-two", atol=0.0)
    _assert_same_weights(run["two"], tmp_path / "resume-one", atol=1e-6)


def test_a_corrupted_shard_is_caught_by_the_manifest(sft_runs, tmp_path):
    from align.checkpoint import CheckpointError, verify_checkpoint

    ckpt = shutil.copytree(sft_runs["untied"]["two"] / "checkpoints" / "step-2", tmp_path / "step-2")
    verify_checkpoint(ckpt)
    shard = sorted((ckpt / "dcp").glob("*.distcp"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        verify_checkpoint(ckpt)


def test_dpo_sharded_on_two_gives_the_losses_and_weights_of_one(byte_models, tmp_path):
    """Tied embeddings (the embedding, final norm and head in one FSDP unit)."""
    pairs = preference_pairs(generate_tasks(24, seed=7), seed=7, format_error_rate=0.3)
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    args = {**DPO_ARGS, "model_name_or_path": str(byte_models["tied"]), "dataset": str(data)}
    torchrun("dpo.py", args, tmp_path / "two")
    run_dpo(DPOConfig(**_one(args, tmp_path / "one")))
    for key in ("loss", "rewards_margin", "nll", "grad_norm"):
        assert _column(tmp_path / "two", key) == pytest.approx(_column(tmp_path / "one", key), abs=1e-5), key
    _assert_same_weights(tmp_path / "one", tmp_path / "two", atol=1e-5)
    assert max(_total_bytes(tmp_path / "two")) <= 0.55 * _total_bytes(tmp_path / "one")[0]


def test_rm_sharded_on_two_gives_the_losses_weights_and_accuracy_of_one(byte_models, tmp_path):
    """The reward model's backbone layers and embedding sharded, its scalar head with the root; held-out
    scoring (before training and at the end) on the main process from the gathered weights. `final/` is
    a reward model (backbone, head, reward_config.json) that `RewardModel.from_pretrained` loads."""
    from align.reward import REWARD_HEAD, RewardModel

    pairs = preference_pairs(generate_tasks(32, seed=5), seed=5, format_error_rate=0.3)
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs[:24])
    held = write_jsonl(tmp_path / "held.jsonl", pairs[24:])
    args = {
        **RM_ARGS, "model_name_or_path": str(byte_models["untied"]), "dataset": str(data),
        "eval_dataset": str(held),
    }  # fmt: skip
    torchrun("rm.py", args, tmp_path / "two")
    run_reward(RMConfig(**_one(args, tmp_path / "one")))
    two, one = tmp_path / "two", tmp_path / "one"
    for key in ("loss", "accuracy", "margin", "grad_norm", "eval_accuracy"):
        got, want = ([r[key] for r in read_metrics(d) if key in r] for d in (two, one))
        assert len(got) == (3 if key != "eval_accuracy" else 2), key
        assert got == pytest.approx(want, abs=1e-5), key
    summaries = [json.loads((d / "summary.json").read_text()) for d in (one, two)]
    assert [h["step"] for h in summaries[1]["eval_history"]] == [0, 3]
    assert summaries[1]["eval_history"] == summaries[0]["eval_history"]
    models = [RewardModel.from_pretrained(d / "final") for d in (one, two)]
    state_one, state_two = (m.state_dict() for m in models)
    assert set(state_two) == set(state_one)
    for name in state_one:
        torch.testing.assert_close(state_two[name], state_one[name], atol=1e-5, rtol=0, msg=name)
    saved = load_file(two / "final" / "model.safetensors")
    saved.update({f"head.{k}": v for k, v in load_file(two / "final" / REWARD_HEAD).items()})
    for name, tensor in saved.items():  # what was gathered and written is what loads
        key = name if name.startswith("head.") else f"backbone.{name}"
        assert torch.equal(state_two[key], tensor), name
    assert max(_total_bytes(two)) <= 0.55 * _total_bytes(one)[0]
    assert (two / "checkpoints" / "step-3" / "dcp" / ".metadata").is_file()


def _full_weights_worker(out: Path) -> None:
    """Run by torchrun (see `__main__`): a sharded model trains a step, then decodes greedily under
    `full_weights` for a different number of steps per rank, twice around a second optimiser step."""
    from datetime import timedelta

    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from align.rollout.manual import ManualRolloutEngine
    from align.train.sharding import full_weights, resharded_after, shard_model

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    model = shard_model(Qwen2ForCausalLM(config))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))

    def train_step() -> None:
        model(input_ids=data[rank : rank + 1], labels=data[rank : rank + 1]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    def decode(steps: int) -> tuple[list[int], torch.Tensor]:
        ids = data[rank : rank + 1, :4]
        with torch.no_grad(), full_weights(model):
            for _ in range(steps):  # no KV cache: every step is a whole forward, of this rank's count
                logits = model(input_ids=ids).logits
                ids = torch.cat([ids, logits[:, -1:].argmax(-1)], 1)
        return ids[0].tolist(), logits[0, -1]

    def lockstep_decode(of: torch.nn.Module) -> tuple[list[int], torch.Tensor]:
        """Greedy through the manual engine, in lockstep over the shards when `of` is the sharded model;
        rank 1's row stops at its first token (every id a stop), rank 0's runs to the limit."""
        sharded = of is model
        engine = ManualRolloutEngine(of, None, stop=[], pad_id=0, logprobs="generate", lockstep=sharded)
        with torch.no_grad(), resharded_after(model) if sharded else contextlib.nullcontext():
            got = engine.generate([data[rank, :4].tolist()], n=1, max_new_tokens=6, temperature=0.0,
                                  stop=list(range(97)) if rank else [])  # fmt: skip
        return got.response_ids[0].tolist(), got.logprobs[0]

    result = {}
    for phase in ("first", "second"):
        train_step()
        # The replica every rank builds from the gathered weights after this step: what a fresh rollout must use.
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        replica = Qwen2ForCausalLM(config).eval()
        replica.load_state_dict(full)
        ids, last = decode(steps=6 if rank == 0 else 1)  # rank 1 stops at its first token
        with torch.no_grad():
            expected = replica(input_ids=torch.tensor([ids[:-1]])).logits[0, -1]
        (lock_ids, lock_logps), (want_ids, want_logps) = lockstep_decode(model), lockstep_decode(replica)
        result[phase] = {
            "max_diff": (last - expected).abs().max().item(),
            "new_tokens": len(ids) - 4,
            "all_sharded": all(isinstance(p, DTensor) for p in model.parameters()),
            "lockstep_tokens": len(lock_ids),
            "lockstep_same_tokens": lock_ids == want_ids,
            "lockstep_max_diff": (lock_logps - want_logps).abs().max().item(),
        }
    result["engines"] = _engines_on_sharded_weights(rank)
    result["lockstep"] = _lockstep_on_sharded_weights(rank)
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _engines_on_sharded_weights(rank: int) -> dict[str, dict]:
    """Each rollout engine over a sharded model, greedy: refused outside `full_weights` (it would hang),
    inside it rank 1's rows all stop at their first token (every id is a stop) while rank 0's run to the
    limit, and the tokens are those of the same engine over an unsharded replica."""
    import copy

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from align.rollout.engines import engine_class
    from align.train.sharding import full_weights, shard_model

    tokenizer = byte_tokenizer()
    torch.manual_seed(1)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    replica = Qwen2ForCausalLM(config).eval()
    model = shard_model(copy.deepcopy(replica))
    prompts = [[40, 41, 42, 43], [50 + rank, 51]]
    call = dict(n=2, max_new_tokens=6, temperature=0.0, stop=list(range(len(tokenizer))) if rank else [])
    result = {}
    for name in ("hf", "manual", "static"):
        options = {"batch_size": 4, "logprobs": "none", **({"compile": "off"} if name == "static" else {})}
        engine = engine_class(name)(model, tokenizer, **options)
        try:
            engine.generate(prompts, **call)
            refused = ""
        except RuntimeError as err:
            refused = str(err)
        with torch.no_grad(), full_weights(model):
            got = engine.generate(prompts, **call)
        want = engine_class(name)(replica, tokenizer, **options).generate(prompts, **call)
        result[name] = {
            "refused": refused,
            "lengths": got.lengths.tolist(),
            "same": got.response_ids.tolist() == want.response_ids.tolist(),
        }
    return result


def _lockstep_on_sharded_weights(rank: int) -> dict[str, dict]:
    """The manual and hf engines decoding a sharded model in lockstep (no `full_weights`), greedy and
    sampled, against the same engine under `full_weights` (unshard) with the same seed. Rank 0 has 3 prompts
    x 2 samples (two chunks of 4 rows) and no stop token, so its rows run to the limit; rank 1 has 2 x 2
    rows (one chunk) and every id is a stop, so its rows stop at their first token and it runs an idle
    chunk. Sampled, rank 0 stops on half the vocabulary, so its rows end at different steps. Every forward
    of the model is counted; the static engine is refused."""
    import copy

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from align.rollout.engines import engine_class
    from align.train.sharding import full_weights, resharded_after, shard_model

    tokenizer = byte_tokenizer()
    torch.manual_seed(2)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    model = shard_model(copy.deepcopy(Qwen2ForCausalLM(config).eval()))
    forwards = [0]
    model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    prompts = [[40, 41, 42, 43], [44, 45], [46, 47, 48]] if rank == 0 else [[50, 51], [52, 53, 54]]
    everything = list(range(len(tokenizer)))
    cases = {
        "greedy": dict(temperature=0.0, stop=everything if rank else []),
        "sampled": dict(
            temperature=1.0, top_p=0.9, seed=11 + rank, stop=everything if rank else everything[::2]
        ),
    }
    result = {}
    for name in ("hf", "manual"):
        for case, call in cases.items():
            options = {"batch_size": 4, "logprobs": "none"}
            forwards[0] = 0
            with torch.no_grad(), resharded_after(model):
                lock = engine_class(name)(model, tokenizer, lockstep=True, **options).generate(
                    prompts, n=2, max_new_tokens=6, **call
                )
            lock_forwards = forwards[0]
            with torch.no_grad(), full_weights(model):
                unshard = engine_class(name)(model, tokenizer, **options).generate(
                    prompts, n=2, max_new_tokens=6, **call
                )
            result[f"{name}-{case}"] = {
                "lengths": lock.lengths.tolist(),
                "same": lock.response_ids.tolist() == unshard.response_ids.tolist()
                and lock.lengths.tolist() == unshard.lengths.tolist(),
                "forwards": lock_forwards,
            }
    try:
        engine_class("static")(model, tokenizer, compile="off", logprobs="none", lockstep=True)
        result["static_refused"] = ""
    except ValueError as err:
        result["static_refused"] = str(err)
    return result


def _failed_launch(stderr: str) -> str:
    """What a failed torchrun launch says: the first Python traceback, if any (torchrun's own only names the
    failed rank), and the end of stderr, where a rank that aborted in C++ ("terminate called ...") leaves its
    last words just before torchrun's summary."""
    first = stderr.find("Traceback")
    return f"{stderr[first : first + 2500] if first >= 0 else ''}\n...\n{stderr[-3500:]}"


@pytest.fixture(scope="module")
def full_weights_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full-weights")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
         str(Path(__file__)), "full_weights", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, _failed_launch(proc.stderr)
    return out


def test_every_engine_decodes_sharded_weights_inside_full_weights_only(full_weights_run):
    """hf (synced_gpus off), manual and static (eager): no hang when one rank's rows stop at once and the
    other's run to the limit, the replica's tokens, and a refusal naming `full_weights` outside it."""
    for rank, length in ((0, 6), (1, 1)):
        engines = json.loads((full_weights_run / f"rank{rank}.json").read_text())["engines"]
        for name in ("hf", "manual", "static"):
            assert engines[name]["lengths"] == [length] * 4, (rank, name)
            assert engines[name]["same"], (rank, name)
            assert "full_weights" in engines[name]["refused"], (rank, name)


def test_full_weights_lets_ranks_decode_different_lengths_with_the_new_weights(full_weights_run):
    """Rank 0 decodes 6 tokens while rank 1 stops after 1 (different forward counts would hang a sharded
    model without `full_weights`), each from the weights of the latest optimiser step, twice; on exit
    every parameter is a shard again."""
    for rank, new_tokens in ((0, 6), (1, 1)):
        result = json.loads((full_weights_run / f"rank{rank}.json").read_text())
        for phase in ("first", "second"):
            assert result[phase]["new_tokens"] == new_tokens
            assert result[phase]["max_diff"] < 1e-5, (rank, phase)
            assert result[phase]["all_sharded"], (rank, phase)


def test_lockstep_decodes_sharded_weights_to_the_unshard_samples_without_a_hang(full_weights_run):
    """rollout_sharded=lockstep, manual and hf engines: with the weights left sharded, rank 1 (rows stopping
    at their first token, one chunk) runs as many forwards as rank 0 (rows to the limit, two chunks) and
    both ranks get exactly the tokens of the unshard mode, greedy and sampled with the same seed."""
    ranks = [json.loads((full_weights_run / f"rank{r}.json").read_text())["lockstep"] for r in (0, 1)]
    for engine in ("hf", "manual"):
        greedy = [ranks[r][f"{engine}-greedy"] for r in (0, 1)]
        assert greedy[0]["lengths"] == [6] * 6 and greedy[1]["lengths"] == [1] * 4, engine
        sampled = [ranks[r][f"{engine}-sampled"] for r in (0, 1)]
        assert len(set(sampled[0]["lengths"])) > 1 and sampled[1]["lengths"] == [1] * 4, engine
        for case in (greedy, sampled):
            assert case[0]["same"] and case[1]["same"], engine
            assert case[0]["forwards"] == case[1]["forwards"] > 2, engine  # rank 1 kept step with rank 0
    for rank in ranks:
        assert (
            "cannot decode in lockstep" in rank["static_refused"]
            and "rollout_engine=manual" in rank["static_refused"]
        )


def test_lockstep_decodes_the_weights_of_the_latest_optimiser_step(full_weights_run):
    """After each of two optimiser steps (tied embeddings), a lockstep decode of the sharded model gives the
    tokens and, to 1e-5, the log-probs of an unsharded replica built from the gathered new weights (a stale
    whole unit would be off by the step); rank 1 stops at its first token while rank 0 decodes 6."""
    for rank, length in ((0, 6), (1, 1)):
        result = json.loads((full_weights_run / f"rank{rank}.json").read_text())
        for phase in ("first", "second"):
            assert result[phase]["lockstep_tokens"] == length, (rank, phase)
            assert result[phase]["lockstep_same_tokens"], (rank, phase)
            assert result[phase]["lockstep_max_diff"] < 1e-5, (rank, phase)


# --------------------------------------------------------------------------------------------------
# RL stages: sharded on 2 processes against the same run under DDP on 2 processes (the same per-rank
# rollout seeds, so the same samples while the weights agree), several runs per launch.

RL_ARGS = dict(
    batch_size=8, micro_batch_size=4, samples_per_query=4, max_new_tokens=8, max_steps=3, save_steps=1,
    save_total_limit=3, learning_rate=1e-2, log_rollouts=0, dtype="float32", report_to=["none"],
    progress=False, logging_steps=1,
)  # fmt: skip
RL_STEPS = RL_ARGS["max_steps"]


def rank_tied_reward(batch, texts):
    """`ascii_reward` on rank 0; on rank 1 every response scores 0, so online DPO finds no pair there
    (every group tied) while rank 0 has several: the ranks' slice counts differ."""
    import torch.distributed as dist

    return torch.zeros(len(texts)) if dist.get_rank() == 1 else ascii_reward(batch, texts)


def _run_rl(run: dict) -> dict:
    """One {"stage", "cfg", "reward"}: the stage's run on its config and reward."""
    from align.train.online import run_grpo, run_online_dpo
    from align.train.ppo import run_ppo

    stages = {
        "grpo": (GRPOConfig, run_grpo), "online_dpo": (OnlineDPOConfig, run_online_dpo), "ppo": (PPOConfig, run_ppo),
    }  # fmt: skip
    rewards = {"ascii": ascii_reward, "rank_tied": rank_tied_reward, "model": None}
    config, runner = stages[run["stage"]]
    return runner(config(**run["cfg"]), reward_fn=rewards[run["reward"]])


def _rl_worker(runs: list[dict]) -> None:
    """Run by torchrun (see `__main__`): each {"stage", "cfg", "reward"} in turn, then the process group closed
    as a recipe closes it: left to interpreter exit, gloo's threads can abort a rank after its last run
    ("terminate called without an active exception"; seen here under load)."""
    from align.train.recipe import close_process_group

    for run in runs:
        _run_rl(run)
    close_process_group()


def _launch_rl(runs: list[dict]) -> str:
    env = {
        **os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1", "ALIGN_PG_TIMEOUT_S": "60",
    }  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
         str(Path(__file__)), "rl", json.dumps(runs)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, _failed_launch(proc.stderr)
    return proc.stdout


@pytest.fixture(scope="module")
def rl_runs(byte_models, tmp_path_factory) -> Path:
    """Under sharding=fsdp and under DDP, in one 2-process launch: GRPO (untied, KL to a sharded frozen
    reference, two mini-batches: old log-probs recomputed), online DPO (tied, pairs on rank 0 only) and
    PPO (untied; all four models sharded, the reward model scoring; the pre-training loss on); 3 steps,
    a checkpoint after each (the resume tests start from step 1's)."""
    from transformers import AutoTokenizer

    import chatml
    from align.reward import RewardModel
    from align.tasks import generate_tasks

    root = tmp_path_factory.mktemp("rl-runs")
    tokenizer = AutoTokenizer.from_pretrained(byte_models["untied"])
    _, im_end = chatml.chatml_token_ids(tokenizer)
    rm = RewardModel.from_backbone(byte_models["untied"], end_token_id=im_end, seed=0)
    rm_dir = rm.save_pretrained(root / "rm", tokenizer)
    prompts = write_jsonl(root / "p.jsonl", [{"messages": t.messages} for t in generate_tasks(16, seed=5)])
    base = {**RL_ARGS, "model_name_or_path": str(byte_models["untied"]), "dataset": str(prompts)}
    grpo = {**base, "eval_tasks": 0, "kl_coef": 0.04, "num_mini_batches": 2, "variance_order": False}
    dpo = {**base, "eval_tasks": 0, "model_name_or_path": str(byte_models["tied"]), "learning_rate": 3e-3}
    ppo = {
        **base, "reward_model_path": str(rm_dir), "samples_per_query": 2, "value_warmup_steps": 0,
        "policy_lr": 3e-3, "value_lr": 3e-3, "ptx_coef": 0.5, "train_missing_stages": False,
    }  # fmt: skip
    runs = [
        {
            "stage": stage,
            "reward": reward,
            "cfg": {**cfg, "sharding": sharding, "output_dir": str(root / f"{stage}-{sharding}")},
        }
        for stage, reward, cfg in (
            ("grpo", "ascii", grpo),
            ("online_dpo", "rank_tied", dpo),
            ("ppo", "model", ppo),
        )
        for sharding in ("fsdp", "none")
    ]
    _launch_rl(runs)
    (root / "runs.json").write_text(json.dumps(runs))
    return root


def test_grpo_sharded_gives_the_losses_and_weights_of_ddp(rl_runs):
    """The same samples (reward_mean, response lengths) and losses, KL and norms to 1e-5, the same final
    weights; per-rank parameter + gradient + AdamW bytes about halved."""
    fsdp, ddp = rl_runs / "grpo-fsdp", rl_runs / "grpo-none"
    for key in ("reward_mean", "response_length", "loss", "kl", "clipfrac", "grad_norm"):
        got, want = _column(fsdp, key), _column(ddp, key)
        assert len(got) == RL_STEPS and got == pytest.approx(want, abs=1e-5), key
    assert all(kl > 0 for kl in _column(fsdp, "kl")[1:])  # the policy moved off the reference
    _assert_same_weights(ddp, fsdp, atol=1e-5)
    assert max(_total_bytes(fsdp)) <= 0.55 * max(_total_bytes(ddp))


def test_online_dpo_sharded_pads_to_the_largest_slice_count_and_gives_the_losses_of_ddp(rl_runs):
    """Rank 1 has no pair and rank 0 several (two slices of micro_batch_size / 2 = 2 pairs): rank 1 runs
    zero-weight dummy slices to match, instead of hanging; losses, margins and weights those of DDP."""
    fsdp, ddp = rl_runs / "online_dpo-fsdp", rl_runs / "online_dpo-none"
    assert all(pairs >= 3 for pairs in _column(fsdp, "pairs"))  # rank 0's: more than one slice
    for key in ("reward_mean", "pairs", "loss", "dpo_margin", "dpo_accuracy", "grad_norm"):
        got, want = _column(fsdp, key), _column(ddp, key)
        assert len(got) == RL_STEPS and got == pytest.approx(want, abs=1e-5), key
    assert _column(fsdp, "grad_norm")[0] > 0
    _assert_same_weights(ddp, fsdp, atol=1e-5)


def test_ppo_sharded_gives_the_losses_and_weights_of_ddp(rl_runs):
    """Policy and value model trained sharded, reference and reward model sharded frozen: the DDP run's
    scores, KL, losses and norms to 1e-5, and its final policy and value model."""
    fsdp, ddp = rl_runs / "ppo-fsdp", rl_runs / "ppo-none"
    keys = [
        "closed_frac", "score_std_within_query", "score_normalised", "kl", "entropy", "value_loss", "approx_kl",
        "ratio_mean", "ptx_loss", "policy_grad_norm", "value_grad_norm", "response_length",
    ]  # fmt: skip
    for key in keys:
        got, want = _column(fsdp, key), _column(ddp, key)
        assert len(got) == RL_STEPS and got == pytest.approx(want, abs=1e-5), key
    assert _column(fsdp, "score_std_within_query")[0] > 0  # the sharded reward model scored
    _assert_same_weights(ddp, fsdp, atol=1e-5)
    from align.reward import RewardModel

    values = [RewardModel.from_pretrained(d / "value").state_dict() for d in (ddp, fsdp)]
    for name, tensor in values[0].items():
        torch.testing.assert_close(values[1][name], tensor, atol=1e-5, rtol=0, msg=name)
    assert max(_total_bytes(fsdp)) <= 0.55 * max(_total_bytes(ddp))  # all four models, per rank


def _from_checkpoint(run: dict, step: int, out: Path, **keys) -> dict:
    """`run` in a fresh `out` holding only its run marker and checkpoint `step`: what a kill -9 right after
    that checkpoint leaves (metrics, final model and later checkpoints gone)."""
    src = Path(run["cfg"]["output_dir"])
    (out / "checkpoints").mkdir(parents=True)
    shutil.copy(src / ".align-run.json", out)
    shutil.copytree(src / "checkpoints" / f"step-{step}", out / "checkpoints" / f"step-{step}")
    return {**run, "cfg": {**run["cfg"], **keys, "output_dir": str(out)}}


def _sharded_rl_runs(rl_runs: Path) -> dict[str, dict]:
    return {
        r["stage"]: r
        for r in json.loads((rl_runs / "runs.json").read_text())
        if r["cfg"]["sharding"] == "fsdp"
    }


@pytest.fixture(scope="module")
def rl_resumed(rl_runs, tmp_path_factory) -> Path:
    """One fresh 2-process launch with sharding=fsdp: the sharded PPO (untied), GRPO (untied) and online DPO
    (tied embeddings) runs' step-1 checkpoints resumed, and the GRPO run again from the start with
    rollout_sharded=lockstep (`grpo-lockstep`)."""
    root = tmp_path_factory.mktemp("rl-resumed")
    runs = _sharded_rl_runs(rl_runs)
    resumed = [_from_checkpoint(run, 1, root / stage) for stage, run in runs.items()]
    grpo = runs["grpo"]
    lockstep = {
        **grpo,
        "cfg": {**grpo["cfg"], "rollout_sharded": "lockstep", "output_dir": str(root / "grpo-lockstep")},
    }
    (root / "stdout.txt").write_text(_launch_rl([*resumed, lockstep]))
    return root


@pytest.mark.parametrize("stage", ["ppo", "grpo", "online_dpo"])
def test_a_sharded_rl_run_resumed_on_two_continues_its_curve_bit_exact(rl_runs, rl_resumed, stage):
    """Killed after the step-1 checkpoint and resumed on 2 processes: steps 2 and 3 log every metric of the
    uninterrupted run bit for bit (samples, rewards, losses, norms, KL; not the timings) and end with its
    final weights exactly (PPO: the value model too). The per-rank RNG, the optimiser moments, the schedules
    and the trainer state (reward statistics, ptx position) came back from the sharded checkpoint."""
    uninterrupted, resumed = rl_runs / f"{stage}-fsdp", rl_resumed / stage
    want, got = read_metrics(uninterrupted)[1:], read_metrics(resumed)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [2, 3]
    keys = [k for k in want[0] if not k.startswith("time_") and not k.endswith("_per_s")]
    assert {"loss", "grad_norm"} <= set(keys) or {"value_loss", "policy_grad_norm", "ptx_loss"} <= set(keys)
    for key in keys:
        assert [r[key] for r in got] == [r[key] for r in want], key
    _assert_same_weights(uninterrupted, resumed, atol=0.0)
    if stage == "ppo":
        a, b = (load_file(d / "value" / "model.safetensors") for d in (uninterrupted, resumed))
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_a_sharded_rl_checkpoint_is_refused_at_another_world_size(rl_runs, tmp_path, stage):
    """2 -> 1 is refused, not continued differently: each process samples its share of the queries with
    its own seed (seed, step, rank), so one process would draw other rollouts than the run it resumes.
    The refusal comes at restore, before any rollout, naming both world sizes and what to do."""
    run = _from_checkpoint(_sharded_rl_runs(rl_runs)[stage], 1, tmp_path / "one", sharding="none")
    with pytest.raises(RunSetupError, match=r"written by 2 processes and this run has 1: .* resume with 2"):
        _run_rl(run)
    assert not (tmp_path / "one" / "metrics.jsonl").exists() and not (tmp_path / "one" / "final").exists()


def test_grpo_with_lockstep_rollouts_is_the_grpo_run_with_unshard_rollouts(rl_runs, rl_resumed):
    """rollout_sharded=lockstep (hf engine, synced_gpus; the policy decoded from its shards, all 3 steps):
    every metric of the rollout_sharded=unshard run bit for bit, the same final weights."""
    unshard, lockstep = rl_runs / "grpo-fsdp", rl_resumed / "grpo-lockstep"
    want, got = read_metrics(unshard), read_metrics(lockstep)
    assert (rl_resumed / "stdout.txt").read_text().count(
        "rollout_engine=hf decodes the sharded policy in lockstep"
    ) == 1
    assert len(got) == RL_STEPS
    for key in [k for k in want[0] if not k.startswith("time_") and not k.endswith("_per_s")]:
        assert [r[key] for r in got] == [r[key] for r in want], key
    _assert_same_weights(unshard, lockstep, atol=0.0)


# --------------------------------------------------------------------------------------------------
# Refusals and the launch switch (no processes started)


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        (PPOConfig(sharding="fsdp", offload_frozen=True), "offload_frozen=true"),
        (GRPOConfig(sharding="fsdp", eval_tasks=0, rollout_engine="vllm"), "rollout_engine=vllm"),
        (
            GRPOConfig(sharding="fsdp", eval_tasks=0, rollout_engine="static", rollout_compile="on"),
            "rollout_compile=off",
        ),
        (SFTConfig(sharding="fsdp", use_lora=True), "sharding=fsdp with use_lora=true"),
        (
            GRPOConfig(eval_tasks=0, rollout_sharded="lockstep"),
            "rollout_sharded=lockstep without sharding=fsdp",
        ),
        (
            GRPOConfig(sharding="fsdp", eval_tasks=0, rollout_engine="static", rollout_sharded="lockstep"),
            "only the manual and hf engines decode in lockstep",
        ),
        (DPOConfig(sharding="fsdp", eval_tasks=4), "eval_tasks>0"),
    ],
)
def test_what_sharding_cannot_do_is_refused_with_the_keys(cfg, match):
    with pytest.raises(RunSetupError, match=match):
        make_accelerator(cfg)


def test_an_fsdp_launch_shards_every_stage(monkeypatch):
    """accelerate_configs/fsdp.yaml (ACCELERATE_USE_FSDP) implies sharding=fsdp: every stage shards itself."""
    from align.train.sharding import wants_sharding

    configs = [SFTConfig(), RMConfig(), DPOConfig(), PPOConfig(), GRPOConfig(), OnlineDPOConfig()]
    assert not any(wants_sharding(cfg) for cfg in configs)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert all(wants_sharding(cfg) for cfg in configs)


def test_deepspeed_stays_refused_and_names_sharding(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(RunSetupError, match="DeepSpeed is not supported.*sharding=fsdp"):
        make_accelerator(SFTConfig())


def test_memory_report_of_an_unsharded_model_counts_fp32_adamw():
    from align.train.sharding import memory_report

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    model[1].weight.requires_grad_(False)
    report = memory_report(model, accumulation_steps=4)
    params = (12 + 3 + 3 + 3) * 4
    trained = (12 + 3 + 3) * 4
    assert report == {
        "params": params, "grads": trained, "optimizer": 2 * trained,
        "total": params + 3 * trained, "grads_accumulating": 0,
    }  # fmt: skip


if __name__ == "__main__" and sys.argv[1:2] == ["full_weights"]:
    _full_weights_worker(Path(sys.argv[2]))
if __name__ == "__main__" and sys.argv[1:2] == ["rl"]:
    _rl_worker(json.loads(sys.argv[2]))
