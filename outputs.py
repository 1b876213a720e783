"""What a run leaves in --save_dir besides the figures: summary.csv, raw maps, accuracy.

Every file is written atomically (a temporary name in the same folder, then a rename), so an
interrupted run never leaves a truncated file. summary.csv rows are also appended, as they are
made, to a per-process log beside it; a rerun with --skip_existing reads the logs back, so an
interrupted run resumes where it stopped and still ends with a complete summary.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
from pathlib import Path
from typing import Iterator

import numpy as np

SUMMARY = "summary.csv"
RAW_FOLDER = "raw"


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path``; renamed onto it when the block succeeds."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def summary_header(top: int) -> list[str]:
    ranks = [f"top{r + 1}" for r in range(top)] + ["lowest"]
    return (["index", "path", "folder_label"]
            + [f"{rank}{suffix}" for rank in ranks for suffix in ("", "_prob")] + ["figures"])


def summary_row(index: int, relative: str, folder_label: str | None, labels: list[str],
                probabilities: list[float], figures: list[str]) -> list[str]:
    pairs = [value for label, p in zip(labels, probabilities) for value in (label, f"{p:.6g}")]
    return [str(index), relative, folder_label or ""] + pairs + [";".join(figures)]


def _log_path(save_dir: Path, rank: int) -> Path:
    return save_dir / f".summary.rank{rank}.log.csv"


class SummaryLog:
    """Append-only log of this process's summary rows, flushed row by row."""

    def __init__(self, save_dir: Path, rank: int) -> None:
        self.rows: list[list[str]] = []
        self._file = open(_log_path(save_dir, rank), "a", newline="", encoding="utf-8")
        self._csv = csv.writer(self._file)

    def write(self, row: list[str]) -> None:
        self.rows.append(row)
        self._csv.writerow(row)
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def previous_rows(save_dir: Path) -> dict[int, list[str]]:
    """Rows of an earlier run: summary.csv, then any logs an interrupted run left (later wins)."""
    rows: dict[int, list[str]] = {}
    sources = [save_dir / SUMMARY] + sorted(save_dir.glob(".summary.rank*.log.csv"))
    for source in sources:
        if not source.exists():
            continue
        with open(source, newline="", encoding="utf-8") as file:
            for row in csv.reader(file):
                if row and row[0].isdigit():
                    rows[int(row[0])] = row
    return rows


def write_summary(save_dir: Path, top: int, rows: list[list[str]]) -> None:
    """summary.csv, sorted by image index, then the per-process logs are removed."""
    rows = sorted(rows, key=lambda row: int(row[0]))
    with atomic_path(save_dir / SUMMARY) as temporary:
        with open(temporary, "w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            writer.writerow(summary_header(top))
            writer.writerows(rows)
    for log in save_dir.glob(".summary.rank*.log.csv"):
        log.unlink()


def raw_path(save_dir: Path, index: int) -> Path:
    return save_dir / RAW_FOLDER / f"image{index}.npz"


def save_raw(path: Path, maps_by_backcount: dict[int, np.ndarray], classes: np.ndarray,
             probabilities: np.ndarray) -> None:
    """image{i}.npz: layer{b} (K, h, w) raw maps per target layer, classes and probs."""
    arrays = {f"layer{b}": np.asarray(m, dtype=np.float32) for b, m in maps_by_backcount.items()}
    arrays["classes"] = np.asarray(classes, dtype=np.int64)
    arrays["probs"] = np.asarray(probabilities, dtype=np.float32)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with atomic_path(path) as temporary:
        temporary.write_bytes(buffer.getvalue())


def _label_names(label: str) -> set[str]:
    return {name.strip().lower().replace("_", " ") for name in label.split(",")} | {
        label.strip().lower().replace("_", " ")}


def accuracy(rows: list[list[str]], labels: list[str], top: int) -> tuple[float, float] | None:
    """Top-1 and top-``top`` accuracy when every image's folder name is one of the labels."""
    known = set().union(*(_label_names(label) for label in labels))
    folder_column = 2
    first_label = 3
    if not rows or any(row[folder_column].strip().lower().replace("_", " ") not in known
                       for row in rows):
        return None
    hits_1 = hits_k = 0
    for row in rows:
        truth = row[folder_column].strip().lower().replace("_", " ")
        predicted = [row[first_label + 2 * r] for r in range(top)]
        matches = [truth in _label_names(label) for label in predicted]
        hits_1 += matches[0]
        hits_k += any(matches)
    return hits_1 / len(rows), hits_k / len(rows)
