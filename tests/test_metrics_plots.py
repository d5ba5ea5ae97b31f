"""Metrics files (JSON lines, CSV, optional TensorBoard) and the PNG plots."""

from __future__ import annotations

import csv
import sys
import types

import numpy as np
import pytest
import torch

from titans.metrics import MetricsLogger, read_metrics
from titans.plots import plot_accuracy_vs_length, plot_loss_curves, plot_needle_heatmap

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_csv(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_jsonl_and_csv_with_growing_header(tmp_path):
    logger = MetricsLogger(tmp_path)
    logger.log({"train/loss": 2.5, "lr": 0.1}, step=1)
    logger.log({"train/loss": torch.tensor(1.5), "lr": np.float32(0.25)}, step=2)
    # not closed: everything must already be on disk
    assert read_metrics(tmp_path) == [{"step": 1, "train/loss": 2.5, "lr": 0.1},
                                      {"step": 2, "train/loss": 1.5, "lr": 0.25}]
    assert read_csv(tmp_path) == (["step", "train/loss", "lr"],
                                  [{"step": "1", "train/loss": "2.5", "lr": "0.1"},
                                   {"step": "2", "train/loss": "1.5", "lr": "0.25"}])
    logger.log({"eval/loss": 1.75, "task": "copy"}, step=2)
    header, rows = read_csv(tmp_path)
    assert header == ["step", "train/loss", "lr", "eval/loss", "task"]
    assert rows[0] == {"step": "1", "train/loss": "2.5", "lr": "0.1", "eval/loss": "", "task": ""}
    assert rows[2] == {"step": "2", "train/loss": "", "lr": "", "eval/loss": "1.75", "task": "copy"}
    logger.log({"lr": 0.05}, step=3)
    assert read_csv(tmp_path)[1][3] == {"step": "3", "train/loss": "", "lr": "0.05", "eval/loss": "", "task": ""}
    logger.close()
    assert len(read_metrics(tmp_path)) == 4


def test_resume_keeps_records_and_truncate_drops_later_steps(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        for step in range(1, 6):
            logger.log({"loss": 1.0 / step}, step=step)
    with MetricsLogger(tmp_path) as logger:
        assert [r["step"] for r in logger.records] == [1, 2, 3, 4, 5]
        logger.truncate(3)  # resumed from the checkpoint at step 3
        logger.log({"loss": 0.3, "acc": 0.5}, step=4)
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5},
                                      {"step": 3, "loss": 1.0 / 3}, {"step": 4, "loss": 0.3, "acc": 0.5}]
    header, rows = read_csv(tmp_path)
    assert header == ["step", "loss", "acc"] and [r["step"] for r in rows] == ["1", "2", "3", "4"]


def test_half_written_last_line_is_dropped(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        logger.log({"loss": 1.0}, step=1)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "lo')  # killed mid-write
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}]
    with MetricsLogger(tmp_path) as logger:
        logger.log({"loss": 0.5}, step=2)
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nbroken\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: invalid JSON line"):
        read_metrics(tmp_path)


def test_disabled_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path / "run", enabled=False)
    logger.log({"loss": 1.0}, step=1)
    logger.close()
    assert not (tmp_path / "run").exists()
    assert read_metrics(tmp_path / "run") == []


def test_bad_metric_values(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        with pytest.raises(TypeError, match="metric 'loss' must be a number or a string, got list"):
            logger.log({"loss": [1.0]}, step=1)
        with pytest.raises(ValueError, match="step argument"):
            logger.log({"step": 3}, step=1)


def test_tensorboard_used_when_installed(tmp_path, monkeypatch):
    calls = []

    class FakeWriter:
        def __init__(self, log_dir):
            calls.append(("init", log_dir))

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            calls.append(("close",))

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    with MetricsLogger(tmp_path) as logger:
        logger.log({"loss": 2.0, "task": "copy", "ok": True}, step=7)
    assert calls == [("init", str(tmp_path / "tensorboard")), ("loss", 2.0, 7), ("close",)]


def test_loss_curves(tmp_path):
    metrics = [{"step": 1, "train/loss": 3.0, "lr": 0.1}, {"step": 2, "train/loss": 2.0},
               {"step": 2, "eval/loss": 2.5}, {"step": 3, "train/loss": 1.0}]
    fig = plot_loss_curves(metrics, tmp_path / "plots" / "loss.png")
    assert (tmp_path / "plots" / "loss.png").read_bytes()[:8] == PNG_MAGIC
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in fig.axes[0].lines}
    assert lines == {"train/loss": ([1, 2, 3], [3.0, 2.0, 1.0]), "eval/loss": ([2], [2.5])}
    with pytest.raises(ValueError, match="no values to plot"):
        plot_loss_curves([{"step": 1, "lr": 0.1}], tmp_path / "none.png")


def test_needle_heatmap(tmp_path):
    acc = [[1.0, 0.5, 0.0], [0.25, 0.75, 1.0]]
    fig = plot_needle_heatmap(acc, [1024, 2048], [0.0, 0.5, 1.0], tmp_path / "niah.png")
    assert (tmp_path / "niah.png").read_bytes()[:8] == PNG_MAGIC
    ax = fig.axes[0]
    np.testing.assert_array_equal(ax.images[0].get_array(), np.array(acc))
    assert [t.get_text() for t in ax.get_yticklabels()] == ["1024", "2048"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "0.5", "1"]
    assert [t.get_text() for t in ax.texts] == ["1.00", "0.50", "0.00", "0.25", "0.75", "1.00"]
    with pytest.raises(ValueError, match=r"accuracy has shape \(2, 3\), expected .* \(3, 2\)"):
        plot_needle_heatmap(acc, [1, 2, 3], [0.0, 1.0], tmp_path / "bad.png")


def test_accuracy_vs_length(tmp_path):
    results = {"mac": {"4096": 0.5, "1024": 1.0, "2048": 0.75}, "transformer": {1024: 0.9, 2048: 0.1}}
    fig = plot_accuracy_vs_length(results, tmp_path / "acc.png")
    assert (tmp_path / "acc.png").read_bytes()[:8] == PNG_MAGIC
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in fig.axes[0].lines}
    assert lines == {"mac": ([1024, 2048, 4096], [1.0, 0.75, 0.5]), "transformer": ([1024, 2048], [0.9, 0.1])}
    assert fig.axes[0].get_xscale() == "log"
    with pytest.raises(ValueError, match="no results"):
        plot_accuracy_vs_length({}, tmp_path / "none.png")
