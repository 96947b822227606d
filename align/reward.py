"""Reward model: a causal-LM backbone plus a scalar head, read at the end token.

The score of a sequence is the head applied to the backbone's last hidden state at the ``<|im_end|>``
that closes the final assistant turn (or a configured end token). That position is found from the token
ids and the attention mask (`end_token_index`), never as "the last non-pad id": pad may equal eos
(SmolLM2's tokenizer pads with ``<|im_end|>`` itself) and padding may be on either side. A sequence
whose end token is missing (truncated away, or a generation that never closed) is flagged in ``found``
and gets ``unclosed_reward`` instead of a score read at whatever token happens to be last.

The same class is the PPO value model: ``forward(..., return_all=True)`` also returns the head applied
at every position (per-token values).

An ensemble reward model (``num_heads`` = K > 1) has K scalar heads on one backbone, one (hidden -> K)
linear layer: ``member_rewards`` (N, K) are the heads' scores, ``rewards`` (N,) their mean (what every
reader of one score sees: evaluation, best-of-n, pair sampling); the RL stages combine the K with
``rm_ensemble_objective`` (mean, min, or mean - lambda x std; `align.rl_math.ensemble_reward`). The heads
are only an ensemble if training made them differ: the trainer gives each head its own loss on its own
bootstrap weighting of the data (`align.train.reward_heads`, RMConfig ``num_heads``, ``head_bootstrap``).

On disk a reward model is an ordinary transformers base-model directory (``config.json``,
``model.safetensors``, tokenizer files) plus ``reward_head.safetensors`` and ``reward_config.json``;
`RewardModel.from_pretrained` reloads it on its own.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

REWARD_CONFIG = "reward_config.json"
REWARD_HEAD = "reward_head.safetensors"
FORMAT_NAME = "align.reward_model"
FORMAT_VERSION = 2  # 2: num_heads (written only when K > 1, so a one-head model stays readable by version 1)


def end_token_index(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    end_token_id: int,
    max_trailing: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each row's reward is read: its last attended end token.

    Args:
        input_ids: (B, T) token ids, padded on the left or the right (or not at all).
        attention_mask: (B, T) 1 on real tokens, 0 on padding; None means no padding. Padding is told
            apart by the mask only, so a pad id equal to the end token's id (SmolLM2) does no harm.
        end_token_id: the id of the end token (``<|im_end|>``).
        max_trailing: real tokens allowed after the end token (e.g. 1 for the newline the chat template
            writes after ``<|im_end|>``); 0: the end token must be the last real token.

    Returns:
        index: (B,) long, the position of the end token; where it is not found, the last real token's
            position (a safe index for gathers; never use the value read there).
        found: (B,) bool, whether the row's last real tokens are the end token plus at most
            ``max_trailing`` others. False for a truncated or unclosed response (and an empty row).
    """
    if input_ids.ndim != 2:
        raise ValueError(f"end_token_index: expected input_ids (B, T), got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"end_token_index: attention_mask {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}"
        )
    real = attention_mask.bool()
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    none = torch.full_like(positions, -1)
    last_real = torch.where(real, positions, none).max(dim=1).values  # (B,), -1 for an empty row
    last_end = torch.where(real & (input_ids == end_token_id), positions, none).max(dim=1).values
    found = (last_end >= 0) & (last_real - last_end <= max_trailing)
    index = torch.where(found, last_end, last_real.clamp(min=0))
    return index, found


def packed_end_index(
    input_ids: torch.Tensor, seq_lens: list[int] | torch.Tensor, end_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """End positions of the sequences packed back to back in one padding-free row.

    Args:
        input_ids: (1, T) or (T,), the concatenated sequences.
        seq_lens: (N,) their lengths, in order, summing to T.
        end_token_id: the end token's id.

    Returns:
        index: (N,) long, the position of each sequence's last token in the row.
        found: (N,) bool, whether that token is the end token.
    """
    flat = input_ids.reshape(-1)
    lens = torch.as_tensor(seq_lens, dtype=torch.long, device=flat.device)
    if lens.numel() == 0 or int(lens.min()) < 1 or int(lens.sum()) != flat.numel():
        raise ValueError(
            f"packed_end_index: sequence lengths {lens.tolist()} do not tile {flat.numel()} tokens"
        )
    index = lens.cumsum(0) - 1
    return index, flat[index] == end_token_id


@dataclass
class RewardOutput:
    """What `RewardModel.forward` returns.

    rewards: (N,) fp32 scores (K > 1 heads: their mean); ``unclosed_reward`` where ``found`` is False.
    found: (N,) bool, whether the end token was there.
    index: (N,) the positions read (per row, or in the packed row).
    values: (B, T) fp32 head output at every position (``return_all=True`` only; K > 1: the heads' mean),
        for PPO's value model.
    member_rewards: (N, K) fp32, each head's score (``unclosed_reward`` where ``found`` is False); (N, 1)
        for a one-head model.
    """

    rewards: torch.Tensor
    found: torch.Tensor
    index: torch.Tensor
    values: torch.Tensor | None = None
    member_rewards: torch.Tensor | None = None


@dataclass
class RewardConfig:
    """The small JSON config saved beside the backbone (``reward_config.json``)."""

    end_token: str = "<|im_end|>"
    end_token_id: int = -1
    hidden_size: int = 0
    unclosed_reward: float = -10.0
    default_system: str | None = None
    max_length: int | None = None
    base_model: str = ""
    num_heads: int = 1  # K scalar heads (an ensemble when K > 1)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        # Version 1 for one head: a reader that predates num_heads loads it as before.
        version = 1 if self.num_heads == 1 else FORMAT_VERSION
        return json.dumps({"format": FORMAT_NAME, "version": version, **asdict(self)}, indent=2) + "\n"

    @classmethod
    def from_file(cls, path: Path) -> RewardConfig:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT_NAME:
            raise ValueError(f"{path} is not an align reward model config")
        if data.get("version", 0) > FORMAT_VERSION:
            raise ValueError(
                f"{path}: reward model format version {data['version']} is newer than this align"
            )
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Loading a base model from a causal-LM checkpoint reports the unused lm_head: expected, not news."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_backbone(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = "auto",
    dropout: float | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """The base transformer (no LM head) of any causal-LM or base-model checkpoint directory."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if dropout is not None:
        from align.models import set_dropout

        set_dropout(config, dropout)
    kwargs: dict[str, Any] = {"config": config, "dtype": dtype, "trust_remote_code": trust_remote_code}
    from align.attention import resolve_attn_implementation

    kwargs["attn_implementation"] = resolve_attn_implementation(attn_implementation, config)
    with _quiet_transformers():
        return AutoModel.from_pretrained(path, **kwargs)


class RewardModel(nn.Module):
    """A base transformer (``backbone``) and a linear head to one scalar (``head``), or to K scalars
    (``config.num_heads``, an ensemble sharing the backbone).

    Build one with `from_backbone` (a new head on any causal LM) or `from_pretrained` (a saved reward
    model, head included). Call it on padded batches (``input_ids``, ``attention_mask``) or on one
    padding-free packed row (``input_ids`` (1, T), ``position_ids`` restarting per sequence, and
    ``end_index``, the positions to read).
    """

    def __init__(self, backbone: nn.Module, config: RewardConfig, head: nn.Linear | None = None) -> None:
        super().__init__()
        hidden = backbone.config.hidden_size
        if config.end_token_id < 0:
            raise ValueError("RewardConfig.end_token_id must be set (see align.data.end_token_id)")
        if config.num_heads < 1:
            raise ValueError(f"RewardConfig.num_heads must be >= 1, got {config.num_heads}")
        if head is not None and head.out_features != config.num_heads:
            raise ValueError(f"the head has {head.out_features} outputs, the config {config.num_heads} heads")
        self.backbone = backbone
        self.config = RewardConfig(**{**asdict(config), "hidden_size": hidden})
        self.head = head if head is not None else nn.Linear(hidden, config.num_heads)
        if head is None:
            # Small random weights (std 1/sqrt(d + 1), as in Stiennon et al. 2020): initial rewards near 0.
            # K heads draw K independent rows; for K = 1 the draw is the one-head model's, unchanged.
            nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(hidden + 1))
            nn.init.zeros_(self.head.bias)
        self.head.to(dtype=next(backbone.parameters()).dtype)

    # ---------------------------------------------------------------------------------------------
    # construction and persistence

    @classmethod
    def from_backbone(
        cls,
        path: str | Path,
        *,
        end_token_id: int,
        end_token: str = "<|im_end|>",
        unclosed_reward: float = -10.0,
        default_system: str | None = None,
        max_length: int | None = None,
        seed: int | None = None,
        num_heads: int = 1,
        **load_kwargs: Any,
    ) -> RewardModel:
        """A new reward model on the backbone of the causal LM at ``path`` (its LM head is dropped); the
        head (``num_heads`` scalar outputs) is initialised from ``seed`` (None: the current torch RNG)."""
        backbone = load_backbone(path, **load_kwargs)
        config = RewardConfig(
            end_token=end_token,
            end_token_id=end_token_id,
            unclosed_reward=unclosed_reward,
            default_system=default_system,
            max_length=max_length,
            base_model=str(path),
            num_heads=num_heads,
        )
        if seed is None:
            return cls(backbone, config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(backbone, config)

    @classmethod
    def from_pretrained(cls, path: str | Path, **load_kwargs: Any) -> RewardModel:
        """Reload a reward model saved by `save_pretrained` (backbone, head and config)."""
        path = Path(path)
        if not (path / REWARD_CONFIG).is_file():
            raise FileNotFoundError(
                f"{path} is not a reward model directory (no {REWARD_CONFIG}); a causal LM is a backbone: "
                "pass it as model_name_or_path instead"
            )
        config = RewardConfig.from_file(path / REWARD_CONFIG)
        backbone = load_backbone(path, **load_kwargs)
        head_state = load_file(path / REWARD_HEAD)
        head = nn.Linear(config.hidden_size, config.num_heads)
        head.load_state_dict(head_state)
        return cls(backbone, config, head=head)

    def save_pretrained(
        self, out_dir: str | Path, tokenizer: Any = None, state_dict: dict[str, torch.Tensor] | None = None
    ) -> Path:
        """Write the backbone (safetensors), ``reward_head.safetensors``, ``reward_config.json`` and the
        tokenizer. A LoRA backbone is merged first (its adapter is kept in ``adapter/``). ``state_dict``
        (keys ``backbone.*``, ``head.*``) replaces the module's own tensors (e.g. gathered under FSDP)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        backbone = self.backbone
        backbone_state = head_state = None
        if hasattr(backbone, "merge_and_unload"):  # peft
            backbone.save_pretrained(out / "adapter", safe_serialization=True)
            backbone = backbone.merge_and_unload()
            self.backbone = backbone
        elif state_dict is not None:
            backbone_state = {
                k[len("backbone.") :]: v for k, v in state_dict.items() if k.startswith("backbone.")
            }
            head_state = {k[len("head.") :]: v for k, v in state_dict.items() if k.startswith("head.")}
        backbone.save_pretrained(out, safe_serialization=True, state_dict=backbone_state)
        head_state = head_state or self.head.state_dict()
        save_file(
            {k: v.detach().float().cpu().contiguous() for k, v in head_state.items()}, out / REWARD_HEAD
        )
        (out / REWARD_CONFIG).write_text(self.config.to_json())
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        return out

    # ---------------------------------------------------------------------------------------------
    # scoring

    @property
    def end_token_id(self) -> int:
        return self.config.end_token_id

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        self.backbone.gradient_checkpointing_enable(**kwargs)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        *,
        end_index: torch.Tensor | None = None,
        max_trailing: int = 0,
        return_all: bool = False,
    ) -> RewardOutput:
        """Score sequences.

        Padded batch: ``input_ids``/``attention_mask`` (B, T), left or right padded; the read position
        of each row comes from `end_token_index`; rewards (B,).
        Packed row: ``input_ids`` and ``position_ids`` (1, T), position ids restarting at 0 for each
        sequence (attention stays inside each), and ``end_index`` (N,) the positions to read (each
        sequence's last token, see `packed_end_index`); rewards (N,).
        ``return_all``: also the head at every position, ``values`` (B, T).
        With K > 1 heads ``rewards`` and ``values`` are the heads' mean and ``member_rewards`` (N, K) each
        head's score (always set; (N, 1) for one head).
        """
        if attention_mask is not None and position_ids is not None:
            from align.attention import check_no_mask_on_packed_rows

            check_no_mask_on_packed_rows(attention_mask, position_ids)
        if attention_mask is not None and position_ids is None:
            # Left padding: positions count real tokens only, so a row scores the same however padded.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,  # with a cache, transformers ignores packed sequence boundaries
        ).last_hidden_state
        if end_index is None:
            index, found = end_token_index(input_ids, attention_mask, self.end_token_id, max_trailing)
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), index]
        else:
            if input_ids.shape[0] != 1:
                raise ValueError("end_index is for one packed row: input_ids must be (1, T)")
            index = end_index
            found = input_ids[0, index] == self.end_token_id
            pooled = hidden[0, index]
        members = self.head(pooled.to(self.head.weight.dtype)).float()  # (N, K)
        placeholder = torch.full_like(members, self.config.unclosed_reward)
        members = torch.where(found[:, None], members, placeholder)
        # One head: the column itself (bit-identical to the one-head model); K heads: their mean.
        rewards = members[:, 0] if members.shape[1] == 1 else members.mean(dim=1)
        values = None
        if return_all:
            values = self.head(hidden.to(self.head.weight.dtype)).float().mean(dim=-1)
        return RewardOutput(rewards=rewards, found=found, index=index, values=values, member_rewards=members)


# ---------------------------------------------------------------------------------------------
# Batching tokenised pairs


def pack_pairs(examples: list[dict[str, Any]], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The chosen and rejected sequences of ``examples`` (from `align.data.tokenize_preference`) back to
    back in one padding-free row, ordered chosen_1, rejected_1, chosen_2, ...

    Returns input_ids and position_ids (1, T), ``end_index`` (2N,) each sequence's last position,
    ``margin`` (N,) (0 where a pair has none) and ``has_margin`` (N,) bool.
    """
    ids: list[int] = []
    pos: list[int] = []
    ends: list[int] = []
    for ex in examples:
        for side in ("chosen_ids", "rejected_ids"):
            seq = ex[side]
            ids.extend(seq)
            pos.extend(range(len(seq)))
            ends.append(len(ids) - 1)
    margins = [ex.get("margin") for ex in examples]
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long, device=device),
        "position_ids": torch.tensor([pos], dtype=torch.long, device=device),
        "end_index": torch.tensor(ends, dtype=torch.long, device=device),
        "margin": torch.tensor([m or 0.0 for m in margins], dtype=torch.float32, device=device),
        "has_margin": torch.tensor([m is not None for m in margins], device=device),
    }


def pad_sequences(
    sequences: list[list[int]], pad_id: int, side: str = "right", device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T), padded on ``side`` with ``pad_id``."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        sl = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        ids[i, sl] = torch.tensor(seq, dtype=torch.long)
        mask[i, sl] = 1
    return ids.to(device), mask.to(device)


def load_reward_model(path: str | Path, **load_kwargs: Any) -> tuple[RewardModel, Any]:
    """A saved reward model and its tokenizer."""
    from align.models import load_tokenizer

    return RewardModel.from_pretrained(path, **load_kwargs), load_tokenizer(str(path))
