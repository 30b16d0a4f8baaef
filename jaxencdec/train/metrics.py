"""Metrics out: JSONL (always), TensorBoard (tensorboardX, optional), a PNG plot at the end; and the text
metrics of generated outputs (ROUGE via rouge-score, BLEU via sacreBLEU), both on a 0-100 scale as
transformers' ``run_summarization`` / ``run_translation`` report them.

Metric names are one scheme in all three outputs and in the final JSON of ``jaxencdec train``: ``train/loss``,
``train/grad_norm``, ``train/learning_rate``, ``train/step_time``, ``train/tokens_per_s``,
``train/token_efficiency``, ``train/data_time`` (seconds a step waited for its batch),
``eval/loss``,
``eval/tokens``, ``eval/rouge1``, ``eval/rouge2``, ``eval/rougeL``, ``eval/bleu``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Sequence

from jaxencdec import paths

# eval.metric -> the names of the scores it adds to an eval
TEXT_METRICS = {"rouge": ("eval/rouge1", "eval/rouge2", "eval/rougeL"), "bleu": ("eval/bleu",)}
# eval.metric -> (module to import, package to pip install)
METRIC_PACKAGES = {"rouge": ("rouge_score", "rouge-score"), "bleu": ("sacrebleu", "sacrebleu")}
# names written by earlier versions (metrics.jsonl, checkpoints, configs' eval.best_metric) -> today's names
LEGACY_NAMES = {"eval_loss": "eval/loss", "eval_tokens": "eval/tokens", "rouge1": "eval/rouge1",
                "rouge2": "eval/rouge2", "rougeL": "eval/rougeL", "bleu": "eval/bleu"}
# ROUGE-1 and ROUGE-L are often equal on short texts: open markers of different shapes and sizes stay visible
ROUGE_STYLES = {"eval/rouge1": {"linestyle": "-", "marker": "o", "markersize": 10, "fillstyle": "none"},
                "eval/rouge2": {"linestyle": "--", "marker": "s", "markersize": 7, "fillstyle": "none"},
                "eval/rougeL": {"linestyle": ":", "marker": "^", "markersize": 5, "fillstyle": "none"}}


def metric_name(name: str) -> str:
    """Today's name of a metric (``rougeL`` -> ``eval/rougeL``); unknown names pass through."""
    return LEGACY_NAMES.get(name, name)


def missing_metric_package(metric: str) -> str | None:
    """The pip package ``eval.metric`` needs when it is not installed, else None (no import is done)."""
    module, package = METRIC_PACKAGES[metric]
    return package if importlib.util.find_spec(module) is None else None


def _summary_writer_class() -> type | None:
    """tensorboardX's ``SummaryWriter``, or None when tensorboardX is not installed (optional: JSONL and the plot
    still work). Imported with torch hidden unless something imported torch already: tensorboardX imports torch
    when it is installed, for type annotations alone, which adds ~1.5 s to a training process's start."""
    hide_torch = "torch" not in sys.modules
    if hide_torch:
        sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX expects
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    finally:
        if hide_torch:
            del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    """Appends ``{"step": s, name: value, ...}`` lines to ``{out_dir}/metrics.jsonl`` and scalars to TensorBoard.

    Only the process with ``enabled=True`` (process 0) writes. ``keep_through_step``: the step training starts
    from (a resumed run's checkpoint step, 0 for a fresh run); the rows of later steps, written by a run that
    was stopped after that checkpoint, are dropped from the file (rewritten atomically) and TensorBoard is told
    to purge its events from there on, so each step has one row however often the run was restarted.

    ``out_dir`` may be a bucket URL (``gs://bucket/run``): the files are then written in a local temporary folder
    and, after each ``write``, what they gained since the last upload (the new row, the new TensorBoard events)
    is appended to their objects (``paths.append_bytes``: on ``gs://`` only the new bytes travel) by a thread of
    the writer's own, so that the training loop does not wait for the store; ``flush`` waits for it, and
    ``close`` too. A file rewritten rather than grown (the plot; ``metrics.jsonl`` without a stopped run's rows)
    is uploaded whole. ``metrics.jsonl`` is downloaded first to continue a resumed run's rows. An upload that
    failed is raised by the next ``write``, ``flush`` or ``close``.
    """

    def __init__(self, out_dir: str, enabled: bool = True, tensorboard: bool = True,
                 keep_through_step: int | None = None):
        self.out_dir = out_dir
        self.enabled = enabled
        self.remote = out_dir if enabled and paths.is_url(out_dir) else None
        self.local_dir = tempfile.mkdtemp(prefix="jaxencdec-metrics-") if self.remote else out_dir
        self.path = os.path.join(self.local_dir, "metrics.jsonl")
        self._uploaded: dict[str, int] = {}  # local file -> its size when last uploaded
        self._uploader = ThreadPoolExecutor(1, thread_name_prefix="jaxencdec-metrics") if self.remote else None
        self._uploads: list[Future] = []  # submitted, in order
        self._tb = None
        if self.remote:
            self._download_rows()
        if enabled and keep_through_step is not None:
            self._drop_rows_after(keep_through_step)
        if enabled and tensorboard:
            SummaryWriter = _summary_writer_class()
            if SummaryWriter is not None:
                purge = None if keep_through_step is None else keep_through_step + 1
                # on a bucket each run's events file needs a name of its own: tensorboardX names them by the second
                suffix = f".{uuid.uuid4().hex[:8]}" if self.remote else ""
                self._tb = SummaryWriter(os.path.join(self.local_dir, "tensorboard"), purge_step=purge,
                                         filename_suffix=suffix)
        self._upload()

    def _download_rows(self) -> None:
        """Copies the bucket's ``metrics.jsonl`` (if any) into the local folder and marks it as uploaded."""
        remote = os.path.join(self.remote, "metrics.jsonl")
        if paths.is_file(remote):
            with open(self.path, "wb") as f:
                f.write(paths.read_bytes(remote))
            self._uploaded[self.path] = os.path.getsize(self.path)

    def _upload(self, rewritten: str | None = None) -> None:
        """On a bucket: hands the uploader thread what each local file (metrics.jsonl, TensorBoard events, the
        plot) gained since its last upload, to append under the same relative name below ``out_dir``; the whole
        file when it shrank or is ``rewritten``."""
        if not self.remote:
            return
        self._raise_failed_upload()
        if self._tb is not None:
            self._tb.flush()
        for folder, _, names in os.walk(self.local_dir):
            for name in names:
                local = os.path.join(folder, name)
                size, done = os.path.getsize(local), self._uploaded.get(local, 0)
                if local == rewritten or size < done:
                    done = 0
                elif size == done:
                    continue
                with open(local, "rb") as f:
                    f.seek(done)
                    data = f.read(size - done)
                remote = os.path.join(self.remote, os.path.relpath(local, self.local_dir).replace(os.sep, "/"))
                send = paths.append_bytes if done else paths.write_bytes
                self._uploads.append(self._uploader.submit(send, remote, data))
                self._uploaded[local] = size

    def _raise_failed_upload(self) -> None:
        """Raises the error of the first finished upload that failed; forgets the finished ones."""
        for future in [f for f in self._uploads if f.done()]:
            self._uploads.remove(future)
            future.result()

    def flush(self) -> None:
        """Waits until every row written so far is stored (on a bucket); raises an upload's error."""
        self._upload()
        for future in self._uploads:
            future.result()
        self._uploads.clear()

    def _lines(self) -> list[str]:
        if not os.path.isfile(self.path):
            return []
        with open(self.path, encoding="utf-8") as f:
            return f.readlines()

    def _rows(self) -> list[dict[str, Any]]:
        """The rows of the file, lines cut short by a kill skipped."""
        return [row for row in map(_parse_row, self._lines()) if row is not None]

    def _drop_rows_after(self, step: int) -> None:
        lines = self._lines()
        kept = [line for line in lines if (row := _parse_row(line)) is not None and row["step"] <= step]
        if kept == lines:
            return
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(line if line.endswith("\n") else line + "\n" for line in kept)
        os.replace(tmp, self.path)

    def write(self, step: int, values: dict[str, float]) -> None:
        """One row; ``values`` maps full metric names (``train/loss``) to numbers (ints stay ints)."""
        if not self.enabled:
            return
        row = {"step": int(step), **{k: v if isinstance(v, int) else float(v) for k, v in values.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step":
                    self._tb.add_scalar(k, v, step)
        self._upload()

    def read(self) -> dict[str, list[tuple[int, float]]]:
        """``name -> [(step, value), ...]`` sorted by step, last write winning, older names mapped to today's."""
        series: dict[str, dict[int, float]] = {}
        for row in self._rows():
            for k, v in row.items():
                if k != "step":
                    series.setdefault(metric_name(k), {})[row["step"]] = v
        return {k: sorted(v.items()) for k, v in series.items()}

    def last_eval(self, through_step: int) -> dict[str, Any]:
        """``{"step": s, "eval/loss": ..., ...}`` of the newest eval at or before ``through_step``; {} if none."""
        evals = {}
        for row in self._rows():
            names = {metric_name(k): v for k, v in row.items() if metric_name(k).startswith("eval/")}
            if names and row["step"] <= through_step:
                evals[row["step"]] = names
        if not evals:
            return {}
        step = max(evals)
        return {"step": step, **evals[step]}

    def figure(self, title: str | None = None):
        """A matplotlib figure of the file's series: losses, learning rate, text metrics (one panel each);
        None when there is nothing to plot or matplotlib is missing."""
        series = self.read()
        if not series:
            return None
        try:
            import matplotlib
        except ImportError:  # optional: the JSONL and TensorBoard files hold the same numbers
            return None
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = [(["train/loss", "eval/loss"], "loss (token cross-entropy)"),
                  (["train/learning_rate"], "learning rate"),
                  (list(TEXT_METRICS["rouge"]), "ROUGE F1 (x 100)"), (list(TEXT_METRICS["bleu"]), "BLEU")]
        panels = [([k for k in names if k in series], label) for names, label in panels]
        panels = [(names, label) for names, label in panels if names]
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
        for ax, (names, label) in zip(axes[0], panels):
            for name in names:
                steps, values = zip(*series[name])
                style = ROUGE_STYLES.get(name, {"marker": "." if len(steps) < 50 else None})
                ax.plot(steps, values, label=name, **style)
            ax.set_xlabel("step")
            ax.set_ylabel(label)
            ax.legend()
            ax.grid(alpha=0.3)
        fig.suptitle(title or os.path.basename(os.path.normpath(self.out_dir)))
        fig.tight_layout()
        return fig

    def plot(self, path: str | None = None, title: str | None = None) -> str | None:
        """Writes ``metrics.png`` (see ``figure``; titled with the run folder's name) and returns its path."""
        if not self.enabled:
            return None
        fig = self.figure(title)
        if fig is None:
            return None
        import matplotlib.pyplot as plt

        local = path or os.path.join(self.local_dir, "metrics.png")
        fig.savefig(local, dpi=100)
        plt.close(fig)
        if path is None and self.remote:
            self._upload(rewritten=local)
            return os.path.join(self.remote, "metrics.png")
        return local

    def close(self) -> None:
        """Closes TensorBoard's writer; on a bucket, waits until everything is stored and removes the local
        folder."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self.remote:
            try:
                self.flush()
            finally:
                self._uploader.shutdown(wait=True)
                shutil.rmtree(self.local_dir, ignore_errors=True)
                self.remote = None


def _parse_row(line: str) -> dict[str, Any] | None:
    """A metrics.jsonl row, or None for a line a kill cut short."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) and "step" in row else None


def text_metrics(metric: str, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """``rouge``: mean ROUGE-1/2/L F1 x 100 (rouge-score, with stemming), keys ``rouge1``, ``rouge2``,
    ``rougeL``; ``bleu``: corpus sacreBLEU (0-100), key ``bleu``."""
    package = missing_metric_package(metric) if metric in METRIC_PACKAGES else None
    if package:
        raise ImportError(f"eval.metric {metric!r} needs the {package} package: pip install {package}")
    if metric == "rouge":
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
        totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
        for hyp, ref in zip(predictions, references):
            scores = scorer.score(ref, hyp)
            for k in totals:
                totals[k] += scores[k].fmeasure
        n = max(len(predictions), 1)
        return {k: 100.0 * v / n for k, v in totals.items()}
    if metric == "bleu":
        import sacrebleu

        return {"bleu": float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)}
    raise ValueError(f"unknown metric {metric!r}")
