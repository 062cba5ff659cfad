"""Writes metrics to `metrics.jsonl` and TensorBoard (tensorboardX, no TensorFlow)."""
from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping

from tensorboardX import SummaryWriter
from tensorboardX.summary import hparams as tb_hparams


class MetricWriter:
    """One JSON object per line (`step` plus keys like `val/mrr@5`) and TensorBoard scalars.

    A run resumed from its checkpoint at step s > 0 keeps the lines and events up to s and drops
    the later ones, which it writes again; a run started again from scratch (killed before its
    first checkpoint) drops them all, its step-0 header included. Either way every step is logged
    once and the logs read as one uninterrupted run.
    """

    def __init__(self, workdir: str | pathlib.Path, resume_step: int = 0, enabled: bool = True) -> None:
        self.enabled = enabled  # False on all hosts but the first of a multi-host run
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        if not enabled:
            return
        first_new = resume_step + 1 if resume_step else 0  # the first step this run writes again
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] < first_new]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._file = self.path.open("a")
        # TensorBoard hides the earlier events at steps >= purge_step once it reads this run's start.
        self._tb = SummaryWriter(str(workdir), purge_step=first_new)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({"step": int(step), **{k: float(v) for k, v in values.items()}}) + "\n")
        self._file.flush()
        for key, value in values.items():
            self._tb.add_scalar(key, float(value), int(step))

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if not self.enabled:
            return
        self._tb.add_text(tag, text, step)

    def hparams(self, hparams: Mapping[str, object], metrics: Mapping[str, float]) -> None:
        """Makes this run one row of TensorBoard's HParams tab, next to the other runs under --logdir.

        Only the session summaries are written, into this run's own directory: TensorBoard then
        builds the table from every run, marks the hparams that differ between them (a sweep's
        overrides) and shows those first. tensorboardX's add_hparams also writes a per-run
        experiment summary, which TensorBoard takes for the whole table: then no hparam differs
        and the five shown by default are the first by name (data.cache_dir, ...).
        """
        if not self.enabled:
            return
        _, start, end = tb_hparams(dict(hparams), dict(metrics))
        file_writer = self._tb._get_file_writer()
        file_writer.add_summary(start)
        file_writer.add_summary(end)
        for key, value in metrics.items():
            self._tb.add_scalar(key, float(value), 0)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        self._tb.close()
