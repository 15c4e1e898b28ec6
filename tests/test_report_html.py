"""--report-html: one self-contained page, per layer what fused into what, the unfused
candidates with their reasons and the check's per-output errors; rendered in a real headless
Chromium (Debian's `chromium`), asserted on its DOM and on a screenshot."""

import json
import os
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest

from ci import need, need_program
from onnx_fuse import cli
from onnx_fuse.report_html import group_by_layer, render

MODELS = os.path.join(os.path.dirname(__file__), os.pardir, "models")
MANIFEST = json.load(open(os.path.join(MODELS, "manifest.json")))["files"]
NAME = "llama-gqa_decode_eager_torchscript.onnx"
LLAMA = os.path.join(MODELS, NAME)
SCREENSHOT_DIR = os.environ.get("ONNX_FUSE_SCREENSHOTS")  # keep the screenshots there if set


def _entry(kind, position, **fields):
    key = "rule" if kind == "fused" else "pattern"
    return {key: fields.pop("name"), "anchor": f"X '{position}'", "position": position, **fields}


def test_layers_are_cut_at_attention_cores():
    fused = [_entry("fused", 10, name="rope"), _entry("fused", 12, name="rope"),
             _entry("fused", 20, name="attention"), _entry("fused", 30, name="kv_cache"),
             _entry("fused", 40, name="attention")]
    unfused = [_entry("unfused", 35, name="rope", reason="r"), _entry("unfused", 90, name="attention", reason="a"),
               {"pattern": "rope", "anchor": "?", "reason": "no position"}]
    groups = group_by_layer(fused, unfused)
    assert [g["layer"] for g in groups] == [0, 1, "after", None]
    assert [e["position"] for e in groups[0]["fused"]] == [10, 12, 20]
    assert [e["position"] for e in groups[1]["fused"]] == [30, 40]
    assert [e["position"] for e in groups[1]["unfused"]] == [35]
    assert [e["reason"] for e in groups[2]["unfused"]] == ["a"]  # after the last core
    assert groups[3]["unfused"][0]["reason"] == "no position"


def test_without_fused_attention_the_candidates_mark_the_layers():
    unfused = [_entry("unfused", 5, name="rope", reason="r"), _entry("unfused", 9, name="attention", reason="a"),
               _entry("unfused", 15, name="attention", reason="a")]
    groups = group_by_layer([], unfused)
    assert [(g["layer"], len(g["unfused"])) for g in groups] == [(0, 2), (1, 1)]


def test_page_escapes_what_it_shows_and_loads_nothing():
    report = {"target": "onnx", "counts": {}, "opset": {"from": 17, "to": 17},
              "fused": [], "check": None,
              "unfused": [_entry("unfused", 3, name="attention", reason="<script>alert(1)</script>")]}
    page = render(report, "a<b>.onnx")
    assert "<script>" not in page and "&lt;script&gt;" in page and "a&lt;b&gt;.onnx" in page
    for reference in ("http:", "https:", "src=", "<link", "@import", "url("):
        assert reference not in page


@pytest.fixture(scope="module")
def report_page(tmp_path_factory):
    """The committed Llama fused without --max-positions: attention fuses, RoPE stays unfused
    with its reason, and the check runs."""
    folder = tmp_path_factory.mktemp("html")
    page, report = folder / "report.html", folder / "report.json"
    code = cli.main(["fuse", LLAMA, "-o", str(folder / "out.onnx"), "--report-html", str(page),
                     "--report", str(report)])
    assert code == 0
    return page, json.loads(report.read_text())


class _Rows(HTMLParser):
    """The layer rows (data-layer), the check rows and the unfused rows of a page."""

    def __init__(self):
        super().__init__()
        self.layers, self.outputs, self.unfused = [], 0, 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr" and "layer" in (attrs.get("class") or "").split():
            self.layers.append(attrs.get("data-layer"))
        if tag == "tr" and "output" in (attrs.get("class") or "").split():
            self.outputs += 1
        if tag == "tr" and attrs.get("class") == "unfused":
            self.unfused += 1


def _chromium(*args, tmp):
    binary = need_program("chromium", "chromium-browser")
    profile = tmp / "profile"
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", f"--user-data-dir={profile}", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_dom_in_chromium_has_the_layers_and_the_check(report_page, tmp_path):
    page, report = report_page
    truth = MANIFEST[NAME]
    dom = _chromium("--dump-dom", f"file://{page}", tmp=tmp_path)
    rows = _Rows()
    rows.feed(dom)
    assert rows.layers == [str(k) for k in range(truth["layers"])]
    assert rows.outputs == len(truth["outputs"])
    assert rows.unfused == len(report["unfused"])
    assert dom.count("→ Attention:") == truth["attention_cores"]
    assert dom.count("→ RotaryEmbedding:") == truth["rope_applications"]
    assert "causal_padding" in dom and "all 5 outputs agree" in dom


def _screenshot(page, tmp_path):
    """Chromium's screenshot of `page` as [pixels, 3] RGB values."""
    Image = need("PIL.Image")
    shot = tmp_path / f"{page.stem}.png"
    _chromium(f"--screenshot={shot}", "--window-size=1280,1000", f"file://{page}", tmp=tmp_path)
    if SCREENSHOT_DIR:
        shutil.copy(shot, os.path.join(SCREENSHOT_DIR, shot.name))
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 1000)
    return np.asarray(image).reshape(-1, 3)


def _shows_a_report(pixels) -> list[str]:
    """What a screenshot lacks to be the report page (empty: nothing)."""
    def share(colour):
        return float(np.all(pixels == colour, axis=1).mean())

    missing = []
    inked = 1 - share((0xfa, 0xfb, 0xfc))  # anything but the page's background
    if not 0.05 < inked < 0.9:
        missing.append(f"text and tables (inked {inked:.3f})")
    if len(np.unique(pixels, axis=0)) <= 200:
        missing.append("anti-aliased text in several colours")
    if share((0xe6, 0xf4, 0xea)) <= 0.002 or share((0xe8, 0xed, 0xf3)) <= 0.002:
        missing.append("passed check rows and table headers in their colours")
    return missing


def test_screenshot_in_chromium_shows_the_page(report_page, tmp_path):
    page, _ = report_page
    assert _shows_a_report(_screenshot(page, tmp_path)) == []


def test_screenshot_check_fails_on_a_blank_page(tmp_path):
    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body style='background:#fafbfc'></body></html>")
    assert len(_shows_a_report(_screenshot(blank, tmp_path))) == 3


def test_a_failed_check_still_gets_its_page(tmp_path, capfd, monkeypatch):
    from onnx_fuse import CheckFailed
    from onnx_fuse.proof import Prover

    really = Prover.require

    def differs(self, model, what, base_dir=None):
        really(self, model, what, base_dir)
        if what == "the fused model":
            self.last["passed"] = False
            self.last["outputs"]["logits"]["passed"] = False
            raise CheckFailed(f"{what} does not match the input model: simulated", self.last)

    monkeypatch.setattr(Prover, "require", differs)
    page = tmp_path / "r.html"
    code = cli.main(["fuse", LLAMA, "-o", str(tmp_path / "o.onnx"), "--report-html", str(page)])
    assert code == 1 and not (tmp_path / "o.onnx").exists()
    html = page.read_text()
    assert "simulated" in html and "FAILED" in html and 'class="output fail"' in html
    capfd.readouterr()


def test_report_html_location_is_checked_first(tmp_path, capfd):
    code = cli.main(["fuse", LLAMA, "-o", str(tmp_path / "o.onnx"),
                     "--report-html", str(tmp_path / "missing" / "r.html")])
    _, err = capfd.readouterr()
    assert code == 2 and "does not exist" in err and os.listdir(tmp_path) == []


def test_report_and_report_html_may_not_be_one_file(tmp_path, capfd):
    same = str(tmp_path / "r")
    code = cli.main(["fuse", LLAMA, "-o", str(tmp_path / "o.onnx"), "--report", same,
                     "--report-html", same])
    _, err = capfd.readouterr()
    assert code == 2 and "name the same file" in err and os.listdir(tmp_path) == []
