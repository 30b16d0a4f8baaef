"""Metrics out: JSONL (always), TensorBoard (tensorboardX, optional), a PNG plot at the end; and the text
metrics of generated outputs (ROUGE via rouge-score, BLEU via sacreBLEU)."""

from __future__ import annotations

import json
import os
from typing import Sequence


class MetricsWriter:
    """Appends ``{"step": s, name: value, ...}`` lines to ``{out_dir}/metrics.jsonl`` and scalars to TensorBoard.

    Only the process with ``enabled=True`` (process 0) writes. A resumed run appends; ``read`` keeps the last
    value written for each ``(name, step)``, so steps redone after a restart are not counted twice.
    """

    def __init__(self, out_dir: str, enabled: bool = True, tensorboard: bool = True):
        self.out_dir = out_dir
        self.enabled = enabled
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self._tb = None
        if enabled and tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:  # optional: JSONL and the plot still work
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))

    def write(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{prefix + k: float(v) for k, v in values.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step":
                    self._tb.add_scalar(k, v, step)

    def read(self) -> dict[str, list[tuple[int, float]]]:
        """``name -> [(step, value), ...]`` sorted by step, last write winning."""
        series: dict[str, dict[int, float]] = {}
        if not os.path.isfile(self.path):
            return {}
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill
                    continue
                for k, v in row.items():
                    if k != "step":
                        series.setdefault(k, {})[row["step"]] = v
        return {k: sorted(v.items()) for k, v in series.items()}

    def plot(self, path: str | None = None) -> str | None:
        """Writes ``metrics.png``: training loss, eval loss and the eval text metrics against steps."""
        if not self.enabled:
            return None
        series = self.read()
        if not series:
            return None
        try:
            import matplotlib
        except ImportError:  # optional: the JSONL and TensorBoard files hold the same numbers
            return None
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = [["train/loss", "eval_loss"], ["train/learning_rate"],
                  [k for k in series if k in ("rouge1", "rouge2", "rougeL", "bleu")]]
        panels = [[k for k in p if k in series] for p in panels]
        panels = [p for p in panels if p]
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
        for ax, names in zip(axes[0], panels):
            for name in names:
                steps, values = zip(*series[name])
                ax.plot(steps, values, marker="." if len(steps) < 50 else None, label=name)
            ax.set_xlabel("step")
            ax.legend()
            ax.grid(alpha=0.3)
        fig.tight_layout()
        path = path or os.path.join(self.out_dir, "metrics.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def text_metrics(metric: str, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """``rouge``: mean ROUGE-1/2/L F1 x 100 (rouge-score, with stemming); ``bleu``: corpus sacreBLEU."""
    if metric == "rouge":
        try:
            from rouge_score import rouge_scorer
        except ImportError as e:
            raise ImportError("ROUGE needs the rouge-score package: pip install rouge-score") from e
        scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
        totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
        for hyp, ref in zip(predictions, references):
            scores = scorer.score(ref, hyp)
            for k in totals:
                totals[k] += scores[k].fmeasure
        n = max(len(predictions), 1)
        return {k: 100.0 * v / n for k, v in totals.items()}
    if metric == "bleu":
        try:
            import sacrebleu
        except ImportError as e:
            raise ImportError("BLEU needs the sacrebleu package: pip install sacrebleu") from e
        return {"bleu": float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)}
    raise ValueError(f"unknown metric {metric!r}")
