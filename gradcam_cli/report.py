"""save_dir/report.html: one self-contained page to browse a run.

The page works straight from disk (file://): its CSS, its JavaScript (report_assets/) and the
run's summary rows are inline, and the figures are linked by relative paths, so the folder can
be zipped or moved. The rows go in as JSON inside a ``<script type="application/json">`` with
``<``, ``>``, ``&`` and the JavaScript line separators escaped, and the script builds the page
with DOM text APIs only: a file name or label is always shown as text, never run.

Which images are right or wrong is decided here, by the same comparison as outputs.accuracy
(folder name against every comma-separated name of the predicted label), so the page and the
printed accuracy agree.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from operator import itemgetter
from pathlib import Path

from . import outputs
from .labels import LabelIndex, name_key

REPORT = "report.html"
ASSETS = Path(__file__).resolve().parent / "report_assets"
_JSON_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026",
                 "\u2028": "\\u2028", "\u2029": "\\u2029"}
_FIRST_LABEL = 3  # summary.csv: index, path, folder_label, then label/probability pairs
BINARY_RANKS = ["positive", "against"]  # a binary model's panels (explainer.ClassPlan)


@dataclass
class ReportInfo:
    """What the page's header says about the run, and the labels that decide right and wrong.

    ``layers``: (tag, module name) per target layer, in the order of the ``figures`` column.
    ``skipped``: (relative path, reason) per image that was not processed.
    ``accuracy``: (top-1, top-k) as printed by the run, or None when folder names are not
    labels. ``settings``: further name/value pairs shown as they are.
    ``finished``: False while a run is still going (the page then says so).
    ``stopped``: why a run stopped early (a fault or a signal), shown with how far it got."""

    model: str
    layers: list[tuple[str, str]]
    method: str
    n_images: int
    labels: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    accuracy: tuple[float, float] | None = None
    metrics: bool = False
    settings: dict[str, str] = field(default_factory=dict)
    finished: bool = True
    stopped: str = ""
    head: str = "softmax"
    threshold: float = 0.5
    methods: list[str] = field(default_factory=list)  # each figure's method, as ``layers``
    means_note: str = ""  # --metrics: each figure's mean faithfulness beside the baselines
    means_header: list[str] = field(default_factory=list)
    means_rows: list[list[str]] = field(default_factory=list)
    sanity: str = ""  # the sanity check's line (--sanity_check), and its table
    sanity_header: list[str] = field(default_factory=list)
    sanity_rows: list[list[str]] = field(default_factory=list)


def run_info(signature: dict, labels: list[str], n_images: int,
             skipped: list[tuple[str, str]], accuracy: tuple[float, float] | None,
             finished: bool = True, stopped: str = "") -> ReportInfo:
    """A ReportInfo from a run's signature (main.run_signature: model, targets, options)."""
    model_path, arch = signature.get("model", [None, None])
    model = model_path or "efficientnet-lite0 (built-in)"
    if arch:
        model += f" (--arch {arch})"
    options = signature.get("options", {})
    method = ("counterfactual " if options.get("counterfactual") else "") + \
        ", ".join(options.get("methods") or [options.get("method", "gradcam")]) + \
        (" + guided" if options.get("guided") else "")
    labels_path, imagenet = signature.get("labels", [None, False])
    shown = {"images from": str(signature.get("images", "")),
             "labels": labels_path or ("ImageNet (bundled)" if imagenet else "default names"),
             "classes": ", ".join(labels[c] for c in options.get("classes") or ())
             or _default_classes(options, labels),
             "scale": "shared" if options.get("shared_scale") else "per-map"}
    if options.get("true_class"):
        shown["true class panel"] = "yes"
    return ReportInfo(model=model, layers=[tuple(t[:2]) for t in signature.get("targets", [])],
                      methods=[t[2] if len(t) > 2 else "" for t in signature.get("targets", [])],
                      method=method, n_images=n_images, labels=labels, skipped=list(skipped),
                      accuracy=accuracy, metrics=bool(options.get("metrics")),
                      head=str(options.get("head", "softmax")),
                      threshold=float(options.get("threshold", 0.5)),
                      settings=shown, finished=finished, stopped=stopped)


MEANS_COLUMNS = (("deletion", "deletion AUC \u2193"), ("insertion", "insertion AUC \u2191"),
                 ("drop", "average drop % \u2193"), ("increase", "increase % \u2191"),
                 ("road", "ROAD \u2191"), ("road_morf", "ROAD MoRF \u2193"),
                 ("road_lerf", "ROAD LeRF \u2191"))


def means_table(means) -> tuple[str, list[str], list[list[str]]]:
    """The report's faithfulness table: a row per figure, then the baseline maps."""
    def cells(values: dict[str, float]) -> list[str]:
        scale = {"increase": 100.0}
        return [f"{values[key] * scale.get(key, 1.0):.4g}" for key, _ in MEANS_COLUMNS]
    rows = [[tag, *cells(values)] for tag, values in means.by_tag.items()]
    rows += [[f"baseline: {tag} map", *cells(values)] for tag, values in means.baselines.items()]
    note = (f"Means over the maps of {', '.join(means.ranks)}. A map that does not beat the "
            f"random map is at chance level; one that beats it but not the centred Gaussian "
            f"says little more than 'look at the middle'.")
    return note, ["figure", *[title for _, title in MEANS_COLUMNS]], rows


def _default_classes(options: dict, labels: list[str]) -> str:
    """What the panels show without --classes, in words (see explainer.ClassPlan)."""
    head, top = options.get("head", "softmax"), options.get("max_panels", 3)
    if head == "binary":
        return f"{labels[-1]} and what argues against it (binary: sigmoid of one output)"
    if head == "sigmoid":
        return (f"the top {top} at or above {options.get('threshold', 0.5):g} and the lowest "
                f"(multi-label: a sigmoid per class)")
    return f"top-{top} and lowest"


def write_report(save_dir: Path, header: list[str], rows: list[list[str]],
                 info: ReportInfo) -> Path:
    """Write save_dir/report.html atomically from summary.csv's header and rows.

    Cheap enough to call again every 30-60 s while a long run goes on, so the page fills in
    (pass ``info.finished=False`` then, and the page says so): it reads no file but the first
    figure's header, and 50,000 rows take about half a second of CPU time
    (bench/bench_report.py). A reader never sees a half-written page."""
    data = page_data(header, rows, info, _figure_size(save_dir, rows, header))
    html = _page(data, info)
    path = Path(save_dir) / REPORT
    with outputs.atomic_path(path) as temporary:
        temporary.write_text(html, encoding="utf-8")
    return path


class RunReport:
    """The report of one run: refreshed now and then while the run goes, so a user can watch
    it fill in; written whole at the end; or with the reason when the run stops early.

    A report that cannot be written is a warning, not a fault: the figures and summary.csv
    are what a run must leave, and they are written first."""

    REFRESH_EVERY_S = 60.0

    def __init__(self, save_dir: Path, header: list[str], labels: list[str], signature: dict,
                 n_images: int, top: int | None) -> None:
        self.save_dir = Path(save_dir)
        self.header = header
        self.labels = labels
        self.signature = signature
        self.n_images = n_images
        self.top = top  # k of top-k accuracy; None when the panels are not top-k classes
        self._last = time.monotonic()

    def write(self, rows: list[list[str]], skipped: list[tuple[str, str]],
              finished: bool = True, stopped: str = "", sanity=None, means=None) -> None:
        """Write the page for these rows now (with ``sanity``, a
        ``sanity_run.SanitySummary``, the sanity check's verdict and table; with ``means``,
        a ``summary.MetricMeans``, each figure's mean faithfulness beside the baselines')."""
        binary = self.signature.get("options", {}).get("head") == "binary"
        threshold = self.signature.get("options", {}).get("threshold", 0.5)
        accuracy = outputs.accuracy(rows, self.labels, self.top,
                                    threshold if binary else None) if self.top else None
        info = run_info(self.signature, self.labels, self.n_images, skipped, accuracy,
                        finished=finished, stopped=stopped)
        if sanity is not None:
            info.sanity, info.sanity_header, info.sanity_rows = \
                sanity.line, sanity.header, sanity.rows
        if means is not None:
            info.means_note, info.means_header, info.means_rows = means_table(means)
        try:
            write_report(self.save_dir, self.header, rows, info)
        except OSError as error:
            print(f"warning: {self.save_dir / REPORT} not written "
                  f"({error.strerror or error})", file=sys.stderr)

    def refresh(self, rows, skipped: list[tuple[str, str]]) -> None:
        """Rewrite the in-progress page when ``REFRESH_EVERY_S`` have passed; ``rows`` is
        called only then (reading every process's rows costs a little)."""
        now = time.monotonic()
        if now - self._last < self.REFRESH_EVERY_S:
            return
        self._last = now
        self.write(rows(), skipped, finished=False)


# ----------------------------------------------------------------------------- data

def page_data(header: list[str], rows: list[list[str]], info: ReportInfo,
              figure_size: tuple[int, int] | None = None) -> dict:
    """Everything the page's script needs, column by column, in index order.

    Labels are stored once in ``labels`` and referred to by position, which keeps a 50,000-row
    page small. ``right`` and ``right_k``: top-1 and top-k right (1), wrong (0) or unknown (-1,
    the folder name is not a label). ``prob`` (one column per panel) and ``metric`` (one per
    metrics column) keep summary.csv's own number strings, read by the page: parsing and
    printing 400,000 floats here would be most of the cost of rewriting a 50,000-row report."""
    ranks = [name for name in header[_FIRST_LABEL:header.index("figures")]
             if not name.endswith("_prob")]
    top = sum(rank.startswith("top") for rank in ranks)
    figures_at = header.index("figures")
    metric_columns = [f"{ranks[0]}_{metric}_{tag}" for tag, _ in info.layers
                      for metric in outputs.METRICS] if ranks else []
    metric_columns = [name for name in metric_columns if name in header]
    rows = sorted(rows, key=lambda row: int(row[0]))
    if ranks[:2] == BINARY_RANKS:  # the entries show the class predicted at the threshold
        rows = outputs.binary_predictions(rows, info.threshold)
        ranks = ["predicted", "other"] + ranks[2:]
        top = 1

    def column(at: int) -> list[str]:
        try:
            return list(map(itemgetter(at), rows))
        except IndexError:  # a short row, from an old or hand-edited summary.csv
            return [row[at] if at < len(row) else "" for row in rows]

    ids: dict[str, int] = {}
    folders = column(2)
    panel = [column(_FIRST_LABEL + 2 * k) for k in range(len(ranks))]
    right, right_k, per_class = _judge(info.labels, folders, panel[:top])
    return {"info": {key: value for key, value in asdict(info).items() if key != "labels"},
            "ranks": ranks, "top": top, "metrics": metric_columns,
            "index": [int(row[0]) for row in rows], "path": column(1),
            "folder": [ids.setdefault(f, len(ids)) if f else -1 for f in folders],
            "panel": [[ids.setdefault(label, len(ids)) for label in labels]
                      for labels in panel],
            "figures": column(figures_at), "right": right, "right_k": right_k,
            "labels": list(ids), "classes": _class_table(per_class),
            "figure_size": list(figure_size) if figure_size else None,
            "prob": [column(_FIRST_LABEL + 2 * k + 1) for k in range(len(ranks))],
            "metric": [column(header.index(name)) for name in metric_columns]}


class _Lookup(dict):
    """A dict that computes a missing value once, with ``make``."""

    def __init__(self, make) -> None:
        super().__init__()
        self.make = make

    def __missing__(self, key):
        value = self[key] = self.make(key)
        return value


def _judge(labels: list[str], folders: list[str], top: list[list[str]]):
    """Top-1 and top-k right (1), wrong (0) or unknown (-1) per image, exactly as
    outputs.accuracy decides (the folder name against every name of the predicted labels),
    and per folder class its (top-1, top-k, top-1 label) results."""
    index = LabelIndex(labels)
    truth_of = _Lookup(lambda folder: name_key(folder) if folder and
                       index.find(folder) is not None else None)
    names_of = _Lookup(index.names)
    right, right_k, per_class = [], [], {}
    for folder, *predicted in zip(folders, *top):
        truth = truth_of[folder] if predicted else None
        if truth is None:
            hit_1 = hit_k = -1
        else:
            hits = [truth in names_of[label] for label in predicted]
            hit_1, hit_k = int(hits[0]), int(any(hits))
        right.append(hit_1)
        right_k.append(hit_k)
        if folder:
            per_class.setdefault(folder, []).append((hit_1, hit_k,
                                                     predicted[0] if predicted else None))
    return right, right_k, per_class


def _class_table(per_class: dict[str, list]) -> list[list]:
    """Per folder class: [name, images, top-1 accuracy, top-k accuracy, most frequent wrong
    top-1 label, its count]; accuracies are None where the folder name is not a label."""
    table = []
    for name in sorted(per_class, key=lambda n: (name_key(n), n)):
        results = per_class[name]
        known = [(hit_1, hit_k) for hit_1, hit_k, _ in results if hit_1 != -1]
        wrong = Counter(label for hit_1, _, label in results if hit_1 == 0)
        common = wrong.most_common(1)
        table.append([name, len(results),
                      sum(h[0] for h in known) / len(known) if known else None,
                      sum(h[1] for h in known) / len(known) if known else None,
                      common[0][0] if common else None, common[0][1] if common else 0])
    return table


def _figure_size(save_dir: Path, rows: list[list[str]],
                 header: list[str]) -> tuple[int, int] | None:
    """The first figure's (width, height), so thumbnails have their size before they load."""
    if not rows or "figures" not in header:
        return None
    names = rows[0][header.index("figures")].split(";")
    try:
        from PIL import Image
        with Image.open(Path(save_dir) / names[0]) as image:
            return image.size
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- the page

def embed_json(value) -> str:
    """JSON that is safe inside a <script> element: no '</script>', '<!--' or line
    separators can appear in it."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for raw, escaped in _JSON_ESCAPES.items():
        text = text.replace(raw, escaped)
    return text


@lru_cache(maxsize=1)
def _assets() -> tuple[str, str]:
    return ((ASSETS / "report.css").read_text(encoding="utf-8"),
            (ASSETS / "report.js").read_text(encoding="utf-8"))


def _page(data: dict, info: ReportInfo) -> str:
    """The HTML: a strict content security policy (only this page's own script may run, no
    network), the styles, the data and the script."""
    css, script = _assets()
    digest = hashlib.sha256(script.encode("utf-8")).digest()
    script_hash = base64.b64encode(digest).decode("ascii")
    policy = ("default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'; "
              f"script-src 'sha256-{script_hash}'; base-uri 'none'; form-action 'none'")
    state = " (run stopped)" if info.stopped else "" if info.finished else " (run in progress)"
    title = "Grad-CAM report" + state
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{policy}\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{title}</title>\n<style>\n{css}</style>\n</head>\n<body>\n"
            "<noscript>This report needs JavaScript to show the run.</noscript>\n"
            "<script type=\"application/json\" id=\"report-data\">"
            f"{embed_json(data)}</script>\n<script>{script}</script>\n</body>\n</html>\n")
