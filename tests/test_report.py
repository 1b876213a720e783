"""report.html: its data, its escaping, and the page itself in a real browser.

The browser tests open the report of real runs (the built-in model over data/, with one and two
layers, with --classes, and over a folder of hostile file names and labels) in Debian's
chromium, driven by playwright. Where chromium is missing they are skipped, except under CI
(CI=true), where that is a failure: .ci/run installs it.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pytest

from gradcam_cli import cli, outputs, report
from gradcam_cli.labels import read_labels

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
HOSTILE_FILE = '"><img src=x onerror=alert(1)>.jpg'
HOSTILE_FOLDER = '<s>odd<\\s> & "名前" #?%'
HOSTILE_BROKEN = "broken <b>&amp;.jpg"


# ----------------------------------------------------------------------------- helpers

def run_tool(save_dir: Path, *args: str, images: Path = DATA) -> int:
    return cli.main(["--images_path", str(images), "--n_images", "all", "--save_dir",
                      str(save_dir), "--device", "cpu", "--workers", "0", "--quiet", *args])


def read_summary(save_dir: Path) -> list[dict[str, str]]:
    with open(save_dir / "summary.csv", newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def is_right(folder: str, label: str) -> bool:
    """The reference rule: the folder name, spelt loosely, is the label or one of its names."""
    def key(text: str) -> str:
        return " ".join(text.replace("_", " ").split()).lower()
    return key(folder) in {key(label)} | {key(name) for name in label.split(",")}


@dataclass
class Page:
    """An opened report, with what its console and dialogs said."""

    page: object
    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def indices(self) -> list[int]:
        return self.page.eval_on_selector_all(
            "#entries [data-index]", "els => els.map(e => Number(e.dataset.index))")

    def texts(self, selector: str) -> list[str]:
        return self.page.eval_on_selector_all(selector, "els => els.map(e => e.textContent)")

    def count(self) -> int:
        return int(re.match(r"\d+", self.page.text_content("#count")).group())

    def go(self, hash_: str) -> None:
        """Change the view through the URL hash, as a bookmark would; returns once the page
        has handled the change."""
        self.page.evaluate("h => new Promise(done => { window.addEventListener('hashchange',"
                           " () => setTimeout(done, 0), {once: true}); location.hash = h; })",
                           hash_)


@pytest.fixture(scope="module")
def browser():
    message = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        message = "playwright is not installed (pip install -r requirements-dev.txt)"
    if message is None and not Path(CHROMIUM).exists():
        message = f"{CHROMIUM} is missing (apt-get install chromium)"
    if message is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser tests cannot run under CI: {message}")
        pytest.skip(message)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def open_report(browser):
    """open_report(save_dir, hash) -> Page, once its entries are drawn; closed afterwards."""
    opened = []

    def open_(save_dir: Path, hash_: str = "") -> Page:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        result = Page(page)
        page.on("console", lambda m: result.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: result.errors.append(str(e)))
        page.on("dialog", lambda d: (result.dialogs.append(d.message), d.dismiss()))
        url = (save_dir / "report.html").as_uri() + (f"#{hash_}" if hash_ else "")
        page.goto(url)
        page.wait_for_function("document.querySelector('#count') && "
                               "/^\\d/.test(document.querySelector('#count').textContent)")
        opened.append(result)
        return result

    yield open_
    for result in opened:
        result.page.close()
        assert not result.errors, result.errors
        assert not result.dialogs, result.dialogs


@pytest.fixture(scope="module")
def data_run(tmp_path_factory) -> Path:
    save_dir = tmp_path_factory.mktemp("data run #?% 名")  # figure links must survive these
    assert run_tool(save_dir) == 0
    return save_dir


@pytest.fixture(scope="module")
def two_layer_run(tmp_path_factory) -> Path:
    save_dir = tmp_path_factory.mktemp("two-layer")
    assert run_tool(save_dir, "--conv2d_backcount", "1", "2") == 0
    return save_dir


# ----------------------------------------------------------------------------- data, no browser

def test_embedded_json_cannot_end_the_script_and_reads_back():
    value = {"path": "</script><script>alert(1)</script><!-- & \u2028\u2029 名"}
    text = report.embed_json(value)
    for character in "<>&\u2028\u2029":
        assert character not in text
    assert json.loads(text) == value


def test_right_and_wrong_agree_with_the_printed_accuracy():
    labels = ["tabby, tabby cat", "tiger cat", "crane", "crane", "Egyptian cat"]
    header = outputs.summary_header(["top1", "top2", "top3", "lowest"], ["layer1"], False)
    def row(i, folder, top):
        pairs = [value for label in top + ["tiger cat"] for value in (label, "0.1")]
        return [str(i), f"{folder}/{i}.jpg", folder] + pairs + [f"image{i}.jpg"] + ["1"] * 4
    rows = [row(0, "Tabby_Cat", ["tabby, tabby cat", "crane", "tiger cat"]),
            row(1, "tabby", ["tiger cat", "Egyptian cat", "tabby, tabby cat"]),
            row(2, "crane", ["crane", "tiger cat", "tabby, tabby cat"]),
            row(3, "tiger cat", ["Egyptian cat", "crane", "tabby, tabby cat"])]
    info = report.ReportInfo("m", [("layer1", "conv")], "gradcam", 4, labels)
    data = report.page_data(header, rows, info)
    right, right_k = data["right"], data["right_k"]
    assert right == [1, 0, 1, 0] and right_k == [1, 1, 1, 0]
    top1, top3 = outputs.accuracy(rows, labels, 3)
    assert sum(right) / 4 == top1 and sum(right_k) / 4 == top3
    by_class = {c[0]: c for c in data["classes"]}
    assert by_class["tabby"][1:] == [1, 0.0, 1.0, "tiger cat", 1]
    assert by_class["tiger cat"][1:] == [1, 0.0, 0.0, "Egyptian cat", 1]


def test_a_classes_run_counts_each_image_once_and_judges_none():
    """With --classes the panels are not top-k predictions: nothing is judged, and the class
    table counts every image of a folder once."""
    header = outputs.summary_header(["class1", "class2"], ["layer1"], False)
    rows = [[str(i), f"tabby/{i}.jpg", "tabby", "tabby", "0.5", "tripod", "0.1",
             f"image{i}.jpg", "1", "1"] for i in range(2)]
    info = report.ReportInfo("m", [("layer1", "conv")], "gradcam", 2, ["tabby", "tripod"])
    data = report.page_data(header, rows, info)
    assert data["right"] == [-1, -1] and data["right_k"] == [-1, -1]
    assert data["classes"] == [["tabby", 2, None, None, None, 0]]


def test_unknown_folders_are_not_judged_and_metrics_columns_are_found():
    header = outputs.summary_header(["top1", "top2", "top3", "lowest"], ["layer1"], True)
    row = (["0", "x.jpg", "", "cat", "nan", "dog", "0.2", "cow", "0.1", "ant", "0.0",
            "image0.jpg"] + ["1"] * 4 + ["nan", "inf", "0.5", "1", "-0.2", "0.1", "0.15"] * 4
           + ["0"] * 14)
    info = report.ReportInfo("m", [("layer1", "conv")], "gradcam", 1,
                             ["cat", "dog", "cow", "ant"], metrics=True)
    data = report.page_data(header, [row], info)
    assert data["folder"] == [-1] and data["right"] == [-1] and data["right_k"] == [-1]
    assert data["metrics"] == ["top1_deletion_layer1", "top1_insertion_layer1",
                               "top1_drop_layer1", "top1_increase_layer1",
                               "top1_road_morf_layer1", "top1_road_lerf_layer1",
                               "top1_road_layer1"]
    assert data["metric"] == [["nan"], ["inf"], ["0.5"], ["1"], ["-0.2"], ["0.1"], ["0.15"]]
    assert data["classes"] == [] and len(row) == len(header)


@pytest.mark.slow
def test_no_report_flag(tmp_path):
    assert run_tool(tmp_path, "--n_images", "1", "--no_report") == 0
    assert (tmp_path / "summary.csv").exists() and not (tmp_path / "report.html").exists()


def embedded_data(save_dir: Path) -> dict:
    html = (save_dir / "report.html").read_text(encoding="utf-8")
    found = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', html,
                      re.S)
    return json.loads(found.group(1))


@pytest.mark.slow
def test_a_resumed_run_reports_every_image(tmp_path):
    assert run_tool(tmp_path, "--n_images", "2") == 0
    assert embedded_data(tmp_path)["index"] == [0, 1]
    assert run_tool(tmp_path, "--skip_existing") == 0
    data = embedded_data(tmp_path)
    rows = read_summary(tmp_path)
    assert data["index"] == [int(r["index"]) for r in rows] == [0, 1, 2, 3, 4]
    assert data["path"] == [r["path"] for r in rows]
    assert data["prob"][0] == [r["top1_prob"] for r in rows]


def test_a_long_run_refreshes_the_report_as_it_goes(tmp_path, monkeypatch):
    """With the refresh interval at zero, every finished image rewrites an in-progress page
    with the rows logged so far; the last write is the finished page of every image."""
    monkeypatch.setattr(report.RunReport, "REFRESH_EVERY_S", 0.0)
    writes = []
    original = report.write_report

    def record(save_dir, header, rows, info):
        writes.append(([int(row[0]) for row in rows], info.finished))
        return original(save_dir, header, rows, info)

    monkeypatch.setattr(report, "write_report", record)
    assert run_tool(tmp_path, "--batch_size", "2", "--render_workers", "0") == 0
    live = [indices for indices, finished in writes if not finished]
    assert live and live == sorted(live, key=len) and live[-1] == [0, 1, 2, 3, 4]
    assert live[0] == [0]  # the first refresh already shows the first image
    assert writes[-1] == ([0, 1, 2, 3, 4], True)
    assert embedded_data(tmp_path)["info"]["finished"] is True


@pytest.mark.slow
def test_a_stopped_run_reports_what_is_done_and_why(tmp_path, interrupt_rendering):
    """Ctrl-C after two images: the page holds those two and says why the run stopped."""
    interrupt_rendering(2)
    assert run_tool(tmp_path, "--render_workers", "0") == 130
    data = embedded_data(tmp_path)
    assert data["index"] == [0, 1]
    assert data["info"]["stopped"] == "interrupted (SIGINT)"
    assert "(run stopped)" in (tmp_path / "report.html").read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- in the browser

@pytest.mark.slow
def test_entries_and_count_match_the_summary(data_run, open_report, capsys):
    rows = read_summary(data_run)
    opened = open_report(data_run)
    assert opened.count() == len(rows) == 5
    assert opened.indices() == [int(r["index"]) for r in rows]
    page = opened.page
    paths = opened.texts("#entries .entry .title .path")
    assert paths == [r["path"] for r in rows]
    top1 = opened.texts("#entries .top1 .label")
    assert top1 == [r["top1"] for r in rows]
    probabilities = [text.strip() for text in opened.texts("#entries .top1 .prob")]
    assert probabilities == [f"{100 * float(r['top1_prob']):.1f}%" for r in rows]
    right = sum(is_right(r["folder_label"], r["top1"]) for r in rows)
    in_top3 = sum(any(is_right(r["folder_label"], r[f"top{k}"]) for k in (1, 2, 3)) for r in rows)
    accuracy = page.text_content("#accuracy")
    assert f"top-1 {100 * right / 5:.1f}%" in accuracy
    assert f"top-3 {100 * in_top3 / 5:.1f}%" in accuracy
    # every thumbnail loads from its relative link, though the folder name has # ? % and 名
    loaded = page.wait_for_function(
        "() => { const images = Array.from(document.querySelectorAll('#entries img'));"
        " return images.length === 5 && images.every(i => i.complete && i.naturalWidth > 0)"
        " && images.map(i => decodeURIComponent(i.src.split('/').pop())); }")
    assert loaded.json_value() == [r["figures"] for r in rows]


def test_wrong_and_correct_filters_list_exactly_those_images(data_run, open_report):
    rows = read_summary(data_run)
    wrong = [int(r["index"]) for r in rows if not is_right(r["folder_label"], r["top1"])]
    assert wrong and len(wrong) < len(rows)  # the data has both kinds
    opened = open_report(data_run, "filter=wrong")
    assert opened.indices() == wrong and opened.count() == len(wrong)
    assert len(opened.texts("#entries .entry .mark.bad")) == len(wrong)
    opened.go("filter=correct")
    assert opened.indices() == [int(r["index"]) for r in rows if int(r["index"]) not in wrong]
    opened.page.click("#filter-all")
    assert opened.count() == len(rows)
    assert "filter" not in opened.page.evaluate("location.hash")


def test_probability_sorts(data_run, open_report):
    rows = read_summary(data_run)
    by_probability = sorted(rows, key=lambda r: (float(r["top1_prob"]), int(r["index"])))
    opened = open_report(data_run, "sort=prob-asc")
    assert opened.indices() == [int(r["index"]) for r in by_probability]
    opened.page.select_option("#sort", "prob-desc")
    assert opened.indices() == [int(r["index"]) for r in by_probability[::-1]]
    assert "sort=prob-desc" in opened.page.evaluate("location.hash")


def test_class_filters_typed_and_from_the_class_table(data_run, open_report):
    rows = read_summary(data_run)
    opened = open_report(data_run, "class=tiger_cat&by=predicted")
    assert opened.indices() == [int(r["index"]) for r in rows if r["top1"] == "tiger cat"]
    opened.page.fill("#class", "Tabby")
    tabby = [int(r["index"]) for r in rows if r["folder_label"] == "tabby"]
    assert opened.indices() == [] and opened.count() == 0  # the tabby photo's top-1 is not tabby
    opened.page.select_option("#by", "any")
    assert opened.indices() == tabby
    assert "class=Tabby" in opened.page.evaluate("location.hash")
    opened.page.click('#classes button[data-class="missile"]')
    assert opened.indices() == [int(r["index"]) for r in rows if r["folder_label"] == "missile"]
    suggestions = opened.page.eval_on_selector_all("#class-names option",
                                                   "els => els.map(e => e.value)")
    assert {r["folder_label"] for r in rows} | {r["top1"] for r in rows} == set(suggestions)


def test_thumbnail_opens_its_figure_and_arrow_keys_step_through_the_list(data_run, open_report):
    rows = read_summary(data_run)
    order = [int(r["index"]) for r in sorted(rows, key=lambda r: -float(r["top1_prob"]))]
    opened = open_report(data_run, "sort=prob-desc")
    page = opened.page
    page.click(f'#entries [data-index="{order[1]}"] a.thumb')
    assert page.is_visible("#viewer")

    def shown() -> tuple[int, str]:
        page.wait_for_function("() => { const i = document.querySelector('#viewer-img');"
                               " return i.complete && i.naturalWidth > 0; }")
        index = int(page.get_attribute("#viewer", "data-viewing"))
        source = page.evaluate("document.querySelector('#viewer-img').src")
        return index, source.rsplit("/", 1)[-1]

    assert shown() == (order[1], f"image{order[1]}.jpg")
    page.keyboard.press("ArrowRight")
    assert shown() == (order[2], f"image{order[2]}.jpg")
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowLeft")
    assert shown() == (order[0], f"image{order[0]}.jpg")
    page.keyboard.press("ArrowLeft")  # the first stays
    assert shown()[0] == order[0]
    page.keyboard.press("Escape")
    assert page.is_hidden("#viewer")


@pytest.mark.slow
def test_two_layer_run_shows_each_layers_figure(two_layer_run, open_report):
    rows = read_summary(two_layer_run)
    opened = open_report(two_layer_run)
    page = opened.page
    assert opened.indices() == [int(r["index"]) for r in rows]
    links = page.eval_on_selector_all(
        "#entries .entry", "els => els.map(e => Array.from(e.querySelectorAll('a.thumb'))"
                           ".map(a => a.getAttribute('href')))")
    assert links == [r["figures"].split(";") for r in rows]
    assert links[0] == ["image0_layer1.jpg", "image0_layer2.jpg"]
    captions = opened.texts("#entries .entry:first-child figcaption")
    assert [c.split(" ")[0] for c in captions] == ["layer1", "layer2"]
    page.click('#entries [data-index="0"] a.thumb[data-layer="1"]')
    assert page.evaluate("document.querySelector('#viewer-img').src").endswith("/image0_layer2.jpg")
    page.keyboard.press("ArrowUp")
    assert page.evaluate("document.querySelector('#viewer-img').src").endswith("/image0_layer1.jpg")
    page.keyboard.press("ArrowRight")
    assert page.evaluate("document.querySelector('#viewer-img').src").endswith("/image1_layer1.jpg")


@pytest.mark.slow
def test_a_several_method_run_switches_between_methods(tmp_path, open_report):
    """Every method's figure side by side, or one method's at a time; the choice is kept in
    the address, as the other controls are."""
    assert run_tool(tmp_path, "--n_images", "2", "--method", "gradcam", "layercam") == 0
    opened = open_report(tmp_path)
    page = opened.page
    links = "els => els.map(e => e.getAttribute('href'))"
    assert page.eval_on_selector_all("#entries [data-index='0'] a.thumb", links) == [
        "image0_layer1_gradcam.jpg", "image0_layer1_layercam.jpg"]
    assert opened.texts("#entries [data-index='0'] figcaption") == [
        "layer1_gradcam (_conv_head, gradcam)", "layer1_layercam (_conv_head, layercam)"]
    page.select_option("#method", "layercam")
    assert page.eval_on_selector_all("#entries a.thumb", links) == [
        "image0_layer1_layercam.jpg", "image1_layer1_layercam.jpg"]
    assert "method=layercam" in page.evaluate("location.hash")
    page.click('#entries [data-index="1"] a.thumb')
    assert page.evaluate("document.querySelector('#viewer-img').src").endswith(
        "/image1_layer1_layercam.jpg")
    assert not opened.errors


@pytest.mark.slow
def test_classes_run_has_panels_but_no_right_or_wrong(tmp_path, open_report):
    assert run_tool(tmp_path, "--n_images", "2", "--classes", "281", "tripod") == 0
    opened = open_report(tmp_path)
    page = opened.page
    assert opened.indices() == [0, 1]
    assert "--classes" in page.text_content("#accuracy")
    assert page.is_disabled("#filter-wrong") and page.query_selector(".mark") is None
    labels = opened.texts("#entries .entry:first-child .panels .label")
    rows = read_summary(tmp_path)
    assert labels == [rows[0]["class1"], rows[0]["class2"]] == ["tabby", "tripod"]
    opened.go("sort=prob-desc")
    by_probability = sorted(rows, key=lambda r: -float(r["class1_prob"]))
    assert opened.indices() == [int(r["index"]) for r in by_probability]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Glyph")  # the figure titles' font has no CJK glyphs
def test_hostile_file_names_and_labels_show_as_text_and_never_run(tmp_path, open_report):
    images = tmp_path / "images"
    (images / "tabby").mkdir(parents=True)
    (images / HOSTILE_FOLDER).mkdir()
    shutil.copy(DATA / "tabby" / "chelsea.png", images / "tabby" / HOSTILE_FILE)
    shutil.copy(DATA / "espresso" / "coffee.png", images / HOSTILE_FOLDER / "a #?%'b 名.png")
    (images / "tabby" / HOSTILE_BROKEN).write_text("not an image")
    labels = read_labels(ROOT / "imagenet1000_labels.txt", 1000)
    labels[281] = 'tabby, <img src=x onerror="window.pwned=1"> & "猫" кошка'
    labels[282] = "<i>tiger</i> cat &amp; 'Тигр' 虎 </script><script>window.pwned=2</script>"
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text(repr(dict(enumerate(labels))), encoding="utf-8")
    save_dir = tmp_path / "out"
    assert run_tool(save_dir, "--labels_path", str(labels_file), images=images) == 1
    rows = read_summary(save_dir)
    opened = open_report(save_dir)
    page = opened.page
    page.wait_for_function("Array.from(document.images).every(i => i.complete)")
    assert page.evaluate("window.pwned") is None
    assert page.eval_on_selector_all("img", "els => els.every(e => e.getAttribute('src') !== 'x')")
    assert not page.query_selector_all("main i, main s, main script, header img, header b")
    paths = opened.texts("#entries .title .path")
    assert paths == [r["path"] for r in rows]
    assert f"tabby/{HOSTILE_FILE}" in paths and f"{HOSTILE_FOLDER}/a #?%'b 名.png" in paths
    shown_labels = set(opened.texts("#entries .label"))
    assert {labels[281], labels[282], HOSTILE_FOLDER} <= shown_labels
    skipped = page.eval_on_selector_all("#skipped li", "els => els.map(e => e.textContent)")
    assert len(skipped) == 1 and skipped[0].startswith(f"tabby/{HOSTILE_BROKEN}: not a readable")
    opened.go("q=" + quote(HOSTILE_FILE[:10]))  # the hash carries it as text too
    assert opened.indices() == [int(r["index"]) for r in rows if HOSTILE_FILE in r["path"]]
    page.click("#entries a.thumb")
    page.keyboard.press("Escape")
    assert page.evaluate("window.pwned") is None


def synthetic_report(save_dir: Path, n: int, finished: bool = True) -> list[list[str]]:
    """A --metrics report of ``n`` made-up rows whose figures are all one small JPEG; some
    deletion AUCs are missing (nan)."""
    from PIL import Image
    Image.new("RGB", (40, 10), (90, 90, 90)).save(save_dir / "figure.jpg")
    labels = ["cat", "dog", "cow", "ant"]
    header = outputs.summary_header(["top1", "top2", "top3", "lowest"], ["layer1"], True)
    rows = []
    for i in range(n):
        probability = ((i * 37) % 101) / 101
        deletion = "nan" if i % 7 == 0 else f"{((i * 13) % 29) / 29:.6g}"
        rows.append(outputs.summary_row(i, f"{labels[i % 2]}/{i}.jpg", labels[i % 2],
                                        [labels[1 if i % 4 == 0 else 0], "cow", "ant", "dog"],
                                        [probability, 0.1, 0.05, 0.01], ["figure.jpg"],
                                        ["1"] * 4 + [deletion, "0.5", "1", "0"]))
    info = report.ReportInfo("made up", [("layer1", "conv")], "gradcam", n + 5, labels,
                             metrics=True, accuracy=outputs.accuracy(rows, labels, 3),
                             finished=finished)
    report.write_report(save_dir, header, rows, info)
    return rows


def test_paging_reaches_every_match_and_the_viewer_crosses_pages(tmp_path, open_report):
    rows = synthetic_report(tmp_path, 250, finished=False)
    opened = open_report(tmp_path)
    page = opened.page
    assert opened.count() == 250 and opened.indices() == list(range(100))
    assert page.evaluate("document.querySelectorAll('#entries img').length") == 100  # one page
    assert "still going: 250 of 255" in page.text_content("header")
    page.click("#pager button[data-delta='1']")
    assert opened.indices() == list(range(100, 200)) and "page=2" in page.evaluate("location.hash")
    opened.go("page=3")
    assert opened.indices() == list(range(200, 250))
    opened.go("page=99")  # past the end: the last page
    assert opened.indices() == list(range(200, 250))

    by_probability = sorted(range(250), key=lambda i: (-float(rows[i][4]), i))
    opened.go("sort=prob-desc&page=2")
    assert opened.indices() == by_probability[100:200]
    page.click(f'#entries [data-index="{by_probability[199]}"] a.thumb')
    page.keyboard.press("ArrowRight")
    assert int(page.get_attribute("#viewer", "data-viewing")) == by_probability[200]
    assert "page=3" in page.evaluate("location.hash")
    page.keyboard.press("Escape")
    assert opened.indices() == by_probability[200:]

    wrong = [i for i, row in enumerate(rows) if row[3] != row[2]]
    opened.go("filter=wrong&sort=top1_deletion_layer1-asc")
    def deletion(i: int) -> float:
        value = float(rows[i][-4])
        return value if value == value else float("inf")  # missing ones last
    expected = sorted(wrong, key=lambda i: (deletion(i), i))
    assert opened.count() == len(wrong) == 188
    assert opened.indices() == expected[:100]
    page.click("#pager button[data-delta='last']")
    assert opened.indices() == expected[100 * ((len(wrong) - 1) // 100):]
