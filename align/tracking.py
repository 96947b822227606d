"""Metric sinks: `metrics.jsonl` always, TensorBoard and W&B when asked.

Only the main process writes. On resume, lines logged after the checkpoint's step are dropped from
`metrics.jsonl`, so the file is one clean curve rather than two overlapping ones.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the fact visible
    return value


class MetricsLogger:
    """Append one JSON object per logged step; mirror scalars to TensorBoard / W&B."""

    def __init__(
        self,
        output_dir: str | Path,
        report_to: list[str],
        *,
        enabled: bool = True,
        resume_step: int | None = None,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self._truncate_after(resume_step)
        elif self.path.exists():
            self.path.unlink()
        unknown = set(report_to) - {"tensorboard", "wandb", "none"}
        if unknown:
            raise ValueError(f"report_to: unknown sink(s) {sorted(unknown)}; use tensorboard, wandb or none")
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
        if "wandb" in report_to:
            import wandb  # optional extra: pip install 'align[wandb]'

            self._wandb = wandb.init(config=run_config, dir=str(output_dir), resume="allow")

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except ValueError:
                continue  # a line cut by a kill
        self.path.write_text("".join(k + "\n" for k in kept))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, int | float) and k != "step"}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """The records of `output_dir/metrics.jsonl`, in order."""
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(output_dir: str | Path, keys: list[str], title: str = "") -> Path:
    """Plot the given metrics against step from metrics.jsonl into `output_dir/curves.png`."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    records = read_metrics(output_dir)
    present = [k for k in keys if any(isinstance(r.get(k), int | float) for r in records)]
    fig, axes = plt.subplots(
        len(present), 1, figsize=(7, 2.4 * max(len(present), 1)), sharex=True, squeeze=False
    )
    for ax, key in zip(axes[:, 0], present, strict=True):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float)]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", linewidth=1)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("optimiser step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(output_dir) / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
