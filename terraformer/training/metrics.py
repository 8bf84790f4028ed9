"""Metrics: a JSON-lines log, TensorBoard event files, and a PNG plot of the log.

``OUTPUT_DIR/metrics.jsonl`` holds one JSON object per line, each with a ``step``:

- training records: ``loss``, ``accuracy``, ``grad_norm``, ``lr``, ``tokens_per_s``, ``elapsed_s``;
- evaluation records: ``eval/loss``, ``eval/accuracy``, ``eval/sequence_accuracy``,
  ``eval/bits_per_token``.

TensorBoard events go to ``OUTPUT_DIR/tensorboard/train`` and ``.../eval`` (same tag names in
both, so the curves overlay).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

__all__ = ["METRICS_FILE", "PLOT_FILE", "MetricsWriter", "plot_metrics", "read_metrics"]

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"
EVAL_PREFIX = "eval/"


def _clean(value):
    """A JSON-safe Python number (NaN and inf become strings JSON can hold)."""
    value = float(value)
    if math.isfinite(value):
        return value
    return str(value)


class MetricsWriter:
    """Appends metrics to ``metrics.jsonl`` and (optionally) TensorBoard event files.

    Args:
      output_dir: the run directory.
      start_step: when resuming from a checkpoint at this step, records of later steps (written
        by the interrupted run after its last checkpoint) are dropped first, so that the log
        reads as one uninterrupted run.
      tensorboard: also write TensorBoard event files (tensorboardX).
    """

    def __init__(self, output_dir, start_step: int = 0, tensorboard: bool = True):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.output_dir / METRICS_FILE
        if self.path.exists():
            kept = [r for r in read_metrics(self.output_dir) if r["step"] <= start_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
        self._file = self.path.open("a")
        self._tb = {}
        if tensorboard:
            from tensorboardX import SummaryWriter

            for split in ("train", "eval"):
                self._tb[split] = SummaryWriter(
                    str(self.output_dir / "tensorboard" / split), purge_step=start_step + 1,
                    flush_secs=30,
                )

    def write(self, step: int, metrics: dict) -> None:
        """Writes one record. Keys starting with ``eval/`` go to the eval TensorBoard run."""
        record = {"step": int(step)}
        record.update({k: _clean(v) for k, v in metrics.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for key, value in metrics.items():
            split, tag = ("eval", key[len(EVAL_PREFIX):]) if key.startswith(EVAL_PREFIX) else (
                "train", key)
            if split in self._tb:
                self._tb[split].add_scalar(tag, float(value), int(step))

    def flush(self) -> None:
        self._file.flush()
        for writer in self._tb.values():
            writer.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        for writer in self._tb.values():
            writer.close()
        self._tb = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(output_dir) -> list[dict]:
    """The records of ``output_dir/metrics.jsonl`` (a torn last line is skipped)."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no metrics log: '{path}' does not exist")
    records = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def _series(records, key):
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def plot_metrics(output_dir, path=None) -> Path:
    """Draws loss, accuracy, learning rate and tokens/s from the metrics log as a PNG.

    Returns the PNG's path (default ``output_dir/metrics.png``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(output_dir)
    if not records:
        raise ValueError(f"metrics log '{Path(output_dir) / METRICS_FILE}' holds no records")
    path = Path(path) if path is not None else Path(output_dir) / PLOT_FILE
    panels = [
        ("loss (nats/token)", ["loss", "eval/loss"]),
        ("accuracy", ["accuracy", "eval/accuracy"]),
        ("learning rate", ["lr"]),
        ("tokens / s", ["tokens_per_s"]),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (title, keys) in zip(axes.flat, panels, strict=True):
        for key in keys:
            steps, values = _series(records, key)
            if steps:
                style = "o-" if key.startswith(EVAL_PREFIX) else "-"
                ax.plot(steps, values, style, label=key, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(str(Path(output_dir).resolve().name))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
