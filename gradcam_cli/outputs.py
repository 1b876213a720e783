"""What a run leaves in --save_dir: figure files, summary.csv, raw maps, accuracy.

Every file is written atomically (a temporary name in the same folder, then a rename), so an
interrupted run never leaves a truncated file. summary.csv rows are also appended, as they are
made, to a per-process log beside it; a rerun with --skip_existing reads the logs back, so an
interrupted run resumes where it stopped and still ends with a complete summary.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

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


METRICS = ("deletion", "insertion", "drop", "increase", "road_morf", "road_lerf", "road")
# With --metrics, the same measures for maps that carry no information, on the first panel's
# class (metrics.BASELINE_MAPS): a method's map should beat both.
BASELINE_TAGS = ("random", "gaussian")


def summary_header(ranks: list[str], tags: list[str], metrics: bool) -> list[str]:
    """index, path, folder_label, a label and probability per panel, figures, then each map's
    raw peak per figure tag and, with --metrics, its faithfulness numbers (``METRICS``),
    then those of the baseline maps for the first panel (``BASELINE_TAGS``)."""
    columns = (["index", "path", "folder_label"]
               + [f"{rank}{suffix}" for rank in ranks for suffix in ("", "_prob")]
               + ["figures"]
               + [f"{rank}_peak_{tag}" for tag in tags for rank in ranks])
    if metrics:
        columns += [f"{rank}_{metric}_{tag}" for tag in tags for rank in ranks
                    for metric in METRICS]
        columns += [f"{ranks[0]}_{metric}_{tag}" for tag in BASELINE_TAGS for metric in METRICS]
    return columns


def summary_row(index: int, relative: str, folder_label: str | None, labels: list[str],
                probabilities: list[float | None], figures: list[str],
                extras: list[str]) -> list[str]:
    """One image's row; a panel not shown (a multi-label class below the threshold) has an
    empty label and probability."""
    pairs = [value for label, p in zip(labels, probabilities)
             for value in (label, "" if p is None else f"{p:.6g}")]
    return [str(index), relative, folder_label or ""] + pairs + [";".join(figures)] + extras


def extra_values(peaks: np.ndarray, metrics: np.ndarray | None,
                 baselines: np.ndarray | None = None) -> list[str]:
    """(V, K) peaks, then (V, K, M) metrics and (2, M) baseline metrics, in summary_header's
    order."""
    values = [f"{v:.6g}" for v in np.asarray(peaks).reshape(-1)]
    for block in (metrics, baselines):
        if block is not None:
            values += [f"{v:.6g}" for v in np.asarray(block).reshape(-1)]
    return values


def metric_means(rows: list[list[str]], header: list[str], tags: list[str],
                 ranks: list[str]) -> dict[str, dict[str, float]]:
    """Per layer tag: the mean of each faithfulness metric over the maps of ``ranks``."""
    means = {}
    for tag in tags:
        per_metric = {}
        for metric in METRICS:
            wanted = {f"{rank}_{metric}_{tag}" for rank in ranks}
            columns = [i for i, name in enumerate(header) if name in wanted]
            values = [float(row[i]) for row in rows for i in columns if i < len(row)]
            per_metric[metric] = float(np.mean(values)) if values else float("nan")
        means[tag] = per_metric
    return means


SIGNATURE = ".run-signature.json"


def same_run(save_dir: Path, signature: dict) -> bool:
    """Whether save_dir's outputs were made with these settings (so they can be kept).

    The signature is compared as JSON reads it back (tuples become lists), so settings held in
    tuples (--classes, the preprocessing's mean and std) match their recorded selves."""
    try:
        recorded = json.loads((save_dir / SIGNATURE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return recorded == json.loads(json.dumps(signature, sort_keys=True))


def record_run(save_dir: Path, signature: dict) -> None:
    """Note what the outputs in save_dir are made with, for a later --skip_existing."""
    with atomic_path(save_dir / SIGNATURE) as temporary:
        temporary.write_text(json.dumps(signature, sort_keys=True), encoding="utf-8")


def _log_path(save_dir: Path, rank: int) -> Path:
    return save_dir / f".summary.rank{rank}.log.csv"


class SummaryLog:
    """Append-only log of this process's summary rows, flushed row by row (each row in one
    write, so a run that stops never leaves half a row)."""

    def __init__(self, save_dir: Path, rank: int) -> None:
        self.rows: list[list[str]] = []
        self.path = _log_path(save_dir, rank)
        self._file = open(self.path, "a", newline="", encoding="utf-8")

    def write(self, row: list[str]) -> None:
        line = io.StringIO()
        csv.writer(line).writerow(row)
        self._file.write(line.getvalue())
        self._file.flush()
        self.rows.append(row)

    def close(self) -> None:
        self._file.close()


def remove_logs(save_dir: Path) -> None:
    """The per-process row logs (once summary.csv holds their rows, or for a fresh run)."""
    for log in save_dir.glob(".summary.rank*.log.csv"):
        log.unlink()


def previous_rows(save_dir: Path, with_summary: bool = True) -> dict[int, list[str]]:
    """Rows of an earlier run: summary.csv, then any logs an interrupted run left (later wins).
    Without ``with_summary``, the logs only (the rows the current run has logged so far)."""
    rows: dict[int, list[str]] = {}
    sources = (([save_dir / SUMMARY] if with_summary else [])
               + sorted(save_dir.glob(".summary.rank*.log.csv")))
    for source in sources:
        if not source.exists():
            continue
        try:
            with open(source, newline="", encoding="utf-8") as file:
                for row in csv.reader(file):
                    if row and row[0].isdigit():
                        rows[int(row[0])] = row
        except (OSError, UnicodeDecodeError, csv.Error) as error:
            print(f"warning: ignoring {source}: {error}", file=sys.stderr)
    return rows


def write_summary(save_dir: Path, header: list[str], rows: list[list[str]],
                  keep_logs: bool = False) -> None:
    """summary.csv, sorted by image index; then the per-process logs are removed, unless
    other processes may still be adding to them."""
    rows = sorted(rows, key=lambda row: int(row[0]))
    with atomic_path(save_dir / SUMMARY) as temporary:
        with open(temporary, "w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            writer.writerow(header)
            writer.writerows(rows)
    if not keep_logs:
        remove_logs(save_dir)


RESERVE = ".summary-reserve"


def reserve_space(save_dir: Path, n_rows: int, n_columns: int) -> None:
    """Hold the room summary.csv will need, so that a run stopped by a full disk can still
    write the summary of what it did (released just before the summary is written)."""
    size = min((16 * n_columns + 160) * n_rows + 4096, 256 * 2 ** 20)
    try:
        with open(save_dir / RESERVE, "wb") as file:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(file.fileno(), 0, size)
            else:
                file.write(bytes(size))
    except OSError:  # already full: the summary may then not fit either; the logs keep the rows
        release_space(save_dir)


def release_space(save_dir: Path) -> None:
    with contextlib.suppress(OSError):
        (save_dir / RESERVE).unlink()


def save_jpeg(figure: np.ndarray, path: Path, quality: int = 90) -> None:
    """Encode an RGB array as JPEG, atomically: a reader never sees a half-written file."""
    with atomic_path(path) as temporary:
        Image.fromarray(figure).save(temporary, format="JPEG", quality=quality)


def raw_path(save_dir: Path, index: int) -> Path:
    return save_dir / RAW_FOLDER / f"image{index}.npz"


def save_raw(path: Path, maps_by_tag: dict[str, np.ndarray], classes: np.ndarray,
             probabilities: np.ndarray) -> None:
    """image{i}.npz: raw (K, h, w) maps per target layer (key: its tag, e.g. layer1), classes
    and probs."""
    arrays = {tag: np.asarray(m, dtype=np.float32) for tag, m in maps_by_tag.items()}
    arrays["classes"] = np.asarray(classes, dtype=np.int64)
    arrays["probs"] = np.asarray(probabilities, dtype=np.float32)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with atomic_path(path) as temporary:
        temporary.write_bytes(buffer.getvalue())


def accuracy(rows: list[list[str]], labels: list[str], top: int,
             binary_threshold: float | None = None) -> tuple[float, float] | None:
    """Top-1 and top-``top`` accuracy when every image's folder name is one of the labels.

    A binary model's rows (panels ``positive``, ``against``) predict the positive class when
    its probability is at least ``binary_threshold``, else the other (``binary_predictions``).

    Folder and predicted labels are compared by name, so classes that share a name (ImageNet
    has two 'crane's) count as the same answer, as a folder name cannot tell them apart.
    Each distinct folder and label is spelt out once: a long run's live report asks for this
    over every row so far, once a minute (50,000 rows: 0.6 s of the model process otherwise).
    Rows are the tool's own, of full width (a row with fewer than ``top`` labels is judged on
    the ones it has)."""
    from .labels import LabelIndex, name_key
    if binary_threshold is not None:
        rows = binary_predictions(rows, binary_threshold)
        top = 1
    index = LabelIndex(labels)
    folder_column, first_label = 2, 3
    truths = {folder: name_key(folder) for folder in {row[folder_column] for row in rows}}
    if not rows or any(index.find(folder) is None for folder in truths):
        return None
    spellings: dict[str, set[str]] = {}  # a predicted label -> every way it may be written
    hits_1 = hits_k = 0
    for row in rows:
        truth = truths[row[folder_column]]
        matches = []
        for label in row[first_label:first_label + 2 * top:2]:
            if label not in spellings:
                spellings[label] = index.names(label)
            matches.append(truth in spellings[label])
        hits_1 += matches[0]
        hits_k += any(matches)
    return hits_1 / len(rows), hits_k / len(rows)


def binary_predictions(rows: list[list[str]], threshold: float) -> list[list[str]]:
    """A binary model's rows with the predicted class's label and probability first: the
    positive class where its probability is at least ``threshold``, else the other (the
    two pairs swap places)."""
    first = 3  # index, path, folder, then positive, positive_prob, against, against_prob
    predicted = []
    for row in rows:
        if _as_float(row[first + 1]) >= threshold:
            predicted.append(row)
        else:
            predicted.append(row[:first] + row[first + 2:first + 4] + row[first:first + 2]
                             + row[first + 4:])
    return predicted


def _as_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")
