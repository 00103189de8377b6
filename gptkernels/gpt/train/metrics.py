"""The run's records: out_dir/metrics.jsonl (one JSON object per line, appended on resume) and
the loss curve out_dir/loss.png drawn from it."""
from __future__ import annotations

import json

from gptkernels.gpt.errors import file_op


class MetricsLog:
    """Appends records to metrics.jsonl (on the master rank; a no-op elsewhere)."""

    def __init__(self, path: str, enabled: bool, append: bool):
        self.path = path
        with file_op("write the metrics", path):
            self._f = open(path, "a" if append else "w", encoding="utf-8") if enabled else None

    def record(self, r: dict) -> None:
        if self._f:
            with file_op("write the metrics", self.path):
                self._f.write(json.dumps(r) + "\n")
                self._f.flush()

    def close(self) -> None:
        if self._f:
            self._f.close()
            self._f = None


def plot_metrics(metrics_path: str, png_path: str, title: str = "") -> bool:
    """Loss curve (train and val against step) from a metrics.jsonl; the last record per step wins."""
    train, val = {}, {}
    try:
        with open(metrics_path, encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                if "loss" in r:
                    train[r["step"]] = r["loss"]
                if "val_loss" in r:
                    val[r["step"]] = r["val_loss"]
    except (OSError, ValueError):
        return False
    if not train:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    s = sorted(train)
    ax.plot(s, [train[k] for k in s], label="train", lw=1)
    if val:
        v = sorted(val)
        ax.plot(v, [val[k] for k in v], "o-", label="val", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(png_path, dpi=110)
    except OSError:  # the chart is a convenience: metrics.jsonl holds the numbers
        return False
    finally:
        plt.close(fig)
    return True
