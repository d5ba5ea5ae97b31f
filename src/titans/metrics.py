"""Metrics of a run: JSON lines and CSV in the run directory, plus TensorBoard when it is installed.

Each record is one dict such as ``{"step": 100, "train/loss": 2.31, "lr": 3e-4}``. Files are flushed
after every record, so a killed run keeps everything logged so far.
"""

from __future__ import annotations

import csv
import io
import json
import numbers
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from titans.fileio import atomic_write

__all__ = ["JSONL_FILE", "CSV_FILE", "MetricsLogger", "read_metrics"]

JSONL_FILE = "metrics.jsonl"
CSV_FILE = "metrics.csv"


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All records of ``run_dir/metrics.jsonl`` in order; [] if there is none.

    A last line cut short by a killed process is skipped; a bad line elsewhere, or a line that is not a record (a
    JSON object with an integer ``step``), raises ValueError naming the file and line.
    """
    path = Path(run_dir) / JSONL_FILE
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: invalid JSON line ({exc})") from None
        if not isinstance(record, dict) or type(record.get("step")) is not int:
            raise ValueError(f"{path}:{i + 1}: not a metrics record (a JSON object with an integer 'step'): "
                             f"{line[:60]!r}; move the file away to resume")
        records.append(record)
    return records


class MetricsLogger:
    """Append metric records to ``metrics.jsonl`` and ``metrics.csv`` under ``run_dir``.

    The CSV header is ``step`` followed by every other key in order of first appearance; when a
    record brings a new key the CSV is rewritten (atomically) with the wider header. Records
    already in the run directory (a resumed run) are kept. With ``enabled=False`` (ranks other
    than 0) every method does nothing. Logs to TensorBoard under ``run_dir/tensorboard`` when
    ``torch.utils.tensorboard`` can be imported.
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._records: list[dict] = []
        self._columns: list[str] = ["step"]
        self._tensorboard = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._records = read_metrics(self.run_dir)
        for record in self._records:
            self._add_columns(record)
        self._rewrite()  # also drops a half-written last line left by a killed run
        self._jsonl = open(self.run_dir / JSONL_FILE, "a", encoding="utf-8")
        self._csv = open(self.run_dir / CSV_FILE, "a", encoding="utf-8", newline="")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return
        self._tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"))

    @property
    def records(self) -> list[dict]:
        """Every record logged in this run directory so far."""
        return list(self._records)

    def _add_columns(self, record: Mapping) -> bool:
        new = [k for k in record if k not in self._columns]
        self._columns.extend(new)
        return bool(new)

    def _rewrite(self) -> None:
        lines = "".join(json.dumps(r) + "\n" for r in self._records)
        atomic_write(self.run_dir / JSONL_FILE, lines.encode("utf-8"))
        atomic_write(self.run_dir / CSV_FILE, self._csv_text(self._records, header=True).encode("utf-8"))

    def _csv_text(self, records: list[dict], header: bool) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self._columns, restval="", lineterminator="\n")
        if header:
            writer.writeheader()
        for record in records:
            writer.writerow(record)
        return buffer.getvalue()

    def _reopen(self) -> None:
        self._jsonl.close()
        self._csv.close()
        self._rewrite()
        self._jsonl = open(self.run_dir / JSONL_FILE, "a", encoding="utf-8")
        self._csv = open(self.run_dir / CSV_FILE, "a", encoding="utf-8", newline="")

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Record ``metrics`` (numbers, strings, booleans or None) at optimizer step ``step``."""
        if not self.enabled:
            return
        record: dict[str, Any] = {"step": int(step)}
        for key, value in metrics.items():
            if key == "step":
                raise ValueError("pass the step as the step argument, not as a metric")
            if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:  # 0-d tensor or NumPy scalar
                value = value.item()
            if not (value is None or isinstance(value, (numbers.Number, str))):
                raise TypeError(f"metric '{key}' must be a number or a string, got {type(value).__name__}")
            record[str(key)] = value
        self._records.append(record)
        if self._add_columns(record):
            self._reopen()
        else:
            self._jsonl.write(json.dumps(record) + "\n")
            self._csv.write(self._csv_text([record], header=False))
            self._jsonl.flush()
            self._csv.flush()
        if self._tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, numbers.Real) and not isinstance(value, bool):
                    self._tensorboard.add_scalar(key, value, record["step"])
            self._tensorboard.flush()

    def truncate(self, step: int) -> None:
        """Drop records after ``step``: a run resumed from a checkpoint at ``step`` logs them again."""
        if not self.enabled:
            return
        self._records = [r for r in self._records if r["step"] <= step]
        self._reopen()

    def close(self) -> None:
        """Close the files (further calls to :meth:`log` are errors)."""
        if not self.enabled:
            return
        self._jsonl.close()
        self._csv.close()
        if self._tensorboard is not None:
            self._tensorboard.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
