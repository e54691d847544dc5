"""``attnkit report``: one self-contained HTML file whose plots are embedded PNGs; checked structurally (parsed, every
image decoded) and, where Chromium is installed, rendered headless (screenshot not blank, every image loaded)."""
import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from PIL import Image

from attnkit.catalog import get_variant
from attnkit.tools import bench, report
from attnkit.tools.cli import main
from conftest import one_thread

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)  # one intra-op thread per xdist worker

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


class Parsed(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.tags, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(dict(attrs))

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """A small bench run (SDPA peer, two patterns, three lengths), an MQAR results file and a decode file."""
    d = tmp_path_factory.mktemp("results")
    rows = bench.sweep([get_variant("softmax"), get_variant("gated_delta")], ["causal-self", "cross"],
                       [32, 64, 96], rep=2, min_time_s=0.0, peers=["sdpa-math"], max_recurrent_T=32)
    env = bench.environment("cpu")
    bench.write_json(str(d / "bench.json"), rows, env, {"dtype": "float32", "heads": 4, "dim": 64})
    cells = [{"schema": "attnkit.mqar", "kind": "cell", "key": f"{v}{dm}{lr}", "status": "ok", "variant": v,
              "d_model": dm, "feature_dim": None, "seed": 7, "lr": lr, "accuracy": a, "state_bytes": sb,
              "by_test": {"64x4": a, "128x8": a / 2}, "steps_run": 10, "train_s": 1.0}
             for v, dm, lr, a, sb in [("softmax", 64, 1e-3, 0.9, 2 ** 20), ("softmax", 128, 1e-3, 1.0, 2 ** 21),
                                      ("gated_delta", 64, 1e-3, 0.4, 2 ** 14),
                                      ("gated_delta", 128, 1e-3, 0.7, 2 ** 16)]]
    run = {"schema": "attnkit.mqar", "kind": "run", "seed": 7, "environment": env, "config": {"steps": 10}}
    (d / "mqar.jsonl").write_text("\n".join(json.dumps(x) for x in [run] + cells) + "\n")
    dec = {"environment": env, "rows": [{"impl": impl, "keys": k, "ms": k / s / 1e6, "gbps": s, "B": 8}
                                        for impl, s in [("attnkit", 700.0), ("sdpa-cudnn", 4000.0)]
                                        for k in (4096, 32768, 131072)]}
    (d / "decode.json").write_text(json.dumps(dec))
    return d


def _expected_plots(rows):
    """One time/memory plot per (pattern, mode) with rows, one heatmap per mode."""
    ok = [r for r in rows if r.status == "ok"]
    return len({(r.pattern, r.mode) for r in ok}) + len({r.mode for r in ok})


def test_report_is_one_file_with_every_plot_embedded(results, tmp_path):
    out = tmp_path / "r.html"
    rep = report.write([str(results / "bench.json"), str(results / "mqar.jsonl")], str(out),
                       decode=[str(results / "decode.json")])
    html = out.read_text()
    p = Parsed()
    p.feed(html)
    rows = bench.read_json(str(results / "bench.json"))["rows"]
    n_plots = _expected_plots(rows) + 2 + 1  # bench plots, MQAR accuracy and per-test heatmap, decode
    assert len(rep.plots) == n_plots
    assert len(p.imgs) == n_plots, [i.get("alt") for i in p.imgs]
    assert f"{n_plots} plots" in html
    for img, plot in zip(p.imgs, rep.plots):
        src = img["src"]
        assert src.startswith("data:image/png;base64,")  # embedded: nothing to fetch
        data = base64.b64decode(src.split(",", 1)[1])
        assert data == plot.png and data[:8] == PNG
        w, h = Image.open(io.BytesIO(data)).size
        assert w >= 300 and h >= 150
    assert "src='http" not in html and 'src="http' not in html
    text = " ".join(p.text)
    for needed in ("Benchmark", "MQAR", "Decode", "environment", "efficiency length", "Raw table", "sdpa-math",
                   "gated_delta", torch.__version__):
        assert needed in text, needed
    assert p.tags.count("tr") > len(rows)  # the raw table holds every row


def test_report_reads_schema_1_results_and_rejects_other_files(tmp_path):
    old = ROOT / "benchmarks" / "results" / "cpu-2026-11-22-linear-chunk.json"
    rep = report.write([str(old)], str(tmp_path / "old.html"))
    assert len(rep.plots) >= 1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"something": 1}))
    with pytest.raises(ValueError, match="expected an attnkit bench JSON"):
        report.build([str(bad)])
    with pytest.raises(SystemExit, match="attnkit report"):
        main(["report", str(bad), "-o", str(tmp_path / "x.html")])


def test_report_cli_writes_pngs(results, tmp_path, capsys):
    out = tmp_path / "cli.html"
    assert main(["report", str(results / "bench.json"), "-o", str(out), "--png-dir", str(tmp_path / "png"),
                 "--png-prefix", "cpu-"]) == 0
    pngs = sorted((tmp_path / "png").glob("cpu-*.png"))
    assert pngs and all(p.read_bytes()[:8] == PNG for p in pngs)
    assert "plots" in capsys.readouterr().out


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="no Chromium on this machine (apt-get install chromium)")
def test_report_renders_in_headless_chromium(results, tmp_path):
    """Chromium draws the report: the screenshot is not blank and every <img> decoded (naturalWidth > 0)."""
    rep = report.write([str(results / "bench.json"), str(results / "mqar.jsonl")], str(tmp_path / "r.html"),
                       decode=[str(results / "decode.json")])
    probe = tmp_path / "probe.html"  # the report plus a script that counts the images the browser decoded
    probe.write_text(rep.html.replace("</body>", "<script>window.addEventListener('load', () => {"
                                      "const ok = [...document.images].filter(i => i.complete && i.naturalWidth > 0);"
                                      "document.body.setAttribute('data-images-ok', ok.length);});</script></body>"))
    base = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]
    dom = subprocess.run(base + ["--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=180)
    m = re.search(r'data-images-ok="(\d+)"', dom.stdout)
    assert m, dom.stderr[-2000:]
    assert int(m.group(1)) == len(rep.plots) > 0
    shot = tmp_path / "shot.png"
    subprocess.run(base + [f"--screenshot={shot}", "--window-size=1280,2400", (tmp_path / "r.html").as_uri()],
                   capture_output=True, timeout=180, check=True)
    img = Image.open(shot).convert("RGB")
    colors = img.getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 100, "screenshot is (nearly) blank"
    white = max(c for c, rgb in colors if rgb == (255, 255, 255)) if any(rgb == (255, 255, 255)
                                                                          for _, rgb in colors) else 0
    assert white < 0.97 * img.width * img.height
