"""`cnnexplain report`: collected sections, summary.csv, a self-contained HTML page whose
pictures decode, one-line errors; and the quickstart pipeline end to end (slow)."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from clihelp import assert_one_line_error, run_inproc, snapshot

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("summary", "entanglement", "training", "saliency", "dissection", "tcav", "visualization")


def _pngs(html: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]


def _assert_pngs_decode(html: str) -> int:
    from PIL import Image

    pngs = _pngs(html)
    for data in pngs:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            assert im.size[0] > 50 and im.size[1] > 50
    return len(pngs)


def _fake_run(d: Path, name: str, acc1: float, mis: float) -> Path:
    run = d / name
    run.mkdir(parents=True)
    pd.DataFrame({"epoch": [1, 2], "loss": [1.5, 1.0], "train_acc1": [0.4, 0.6],
                  "val_acc1": [0.35, 0.55]}).to_csv(run / "train_log.csv", index=False)
    pd.DataFrame({"metric": ["ACC1", "ACC3", "MIS"], "value": [acc1, acc1 / 2, mis],
                  "std": [None, 0.01, None], "n": [100, 100, 100], "note": ["", "", ""]}
                 ).to_csv(run / "entanglement.csv", index=False)
    return run


def test_report_of_two_runs_has_tables_plots_and_summary(tmp_path):
    a = _fake_run(tmp_path / "runs", "std", 0.8, 0.1)
    b = _fake_run(tmp_path / "runs", "picnn", 0.78, 0.2)
    r = run_inproc("report", a, b, "--quiet", "--json")
    assert r.code == 0, r.err
    summary = json.loads(r.out)
    index = tmp_path / "runs" / "report" / "index.html"
    assert Path(summary["index"]) == index
    assert summary["sections"] == {"std": ["training", "entanglement"],
                                   "picnn": ["training", "entanglement"]}
    table = pd.read_csv(tmp_path / "runs" / "report" / "summary.csv")
    assert list(table["run"]) == ["std", "picnn"]
    assert table.set_index("run").loc["picnn", "MIS"] == pytest.approx(0.2)
    assert table.set_index("run").loc["std", "ACC3"] == pytest.approx(0.4)
    html = index.read_text()
    # entanglement chart + one training figure per run, each a real PNG
    assert _assert_pngs_decode(html) == 3
    assert "0.78" in html and "picnn" in html


def test_missing_sections_are_left_out_and_bad_csv_is_a_notice(tmp_path):
    run = _fake_run(tmp_path, "x", 0.5, 0.1)
    (run / "tcav").mkdir()
    (run / "tcav" / "tcav.csv").write_bytes(b"\x00\xff\x00 not,a\ncsv\"")
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_inproc("report", run, empty, "--out", tmp_path / "o")
    assert r.code == 0, r.err
    assert "holds no cnnexplain results" in r.err or "holds no cnnexplain results" in r.out
    html = (tmp_path / "o" / "report" / "index.html").read_text()
    assert 'id="tcav"' not in html or "<h3>x</h3>" not in html.split('id="tcav"')[1]


def test_names_from_the_file_system_are_escaped(tmp_path):
    run = _fake_run(tmp_path, "<script>alert(1)", 0.5, 0.1)
    r = run_inproc("report", run, "--quiet")
    assert r.code == 0, r.err
    html = (run / "report" / "index.html").read_text()
    assert "<script" not in html
    assert "&lt;script&gt;alert(1)" in html


@pytest.mark.parametrize("kind", ["absent", "file"])
def test_bad_run_directory_is_one_line_and_writes_nothing(tmp_path, kind):
    target = tmp_path / "r"
    if kind == "file":
        target.write_text("x")
    before = snapshot(tmp_path)
    r = run_inproc("report", target, "--out", tmp_path / "o")
    assert_one_line_error(r, 2, "run directory" if kind == "absent" else "not a run directory")
    assert snapshot(tmp_path) == before


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _check_in_browser(index: Path, tmp: Path) -> None:
    """Load the page in headless Chromium: every <img> decodes (naturalWidth > 0), no console
    error, and a screenshot renders."""
    browser = _chromium()
    if browser is None:
        return
    probe = tmp / "probe.html"
    probe.write_text(index.read_text().replace(
        "</body>", "<script>window.addEventListener('load', () => { const bad = "
        "[...document.images].filter(i => !i.complete || i.naturalWidth === 0).length; "
        "document.title = 'IMAGES ' + document.images.length + ' BROKEN ' + bad; });"
        "</script></body>"))
    base = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            f"--user-data-dir={tmp / 'chrome-profile'}"]
    p = subprocess.run(base + ["--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000",
                               "--dump-dom", probe.as_uri()],
                       capture_output=True, text=True, timeout=180)
    m = re.search(r"<title>IMAGES (\d+) BROKEN (\d+)</title>", p.stdout)
    assert m, (p.stdout[:500], p.stderr[-2000:])
    assert int(m.group(1)) >= 5 and int(m.group(2)) == 0, m.group(0)
    console = [l for l in p.stderr.splitlines() if "CONSOLE" in l and "probe.html" in l]
    assert not console, console
    shot = tmp / "shot.png"
    subprocess.run(base + [f"--screenshot={shot}", "--window-size=1200,2400", index.as_uri()],
                   capture_output=True, timeout=180)
    assert shot.is_file() and shot.stat().st_size > 20_000


@pytest.mark.slow
def test_quickstart_pipeline_end_to_end(tmp_path):
    """recipes/quickstart.sh at CI size (smallcnn, 120 images, 1 epoch): every subcommand runs
    through the shell pipeline and the report shows every section with decodable pictures."""
    out = tmp_path / "qs"
    env = dict(os.environ, QUICKSTART_IMAGES="120", QUICKSTART_EPOCHS="1",
               QUICKSTART_BRODEN="24", QUICKSTART_CONCEPT_IMAGES="24", QUICKSTART_TCAV_RUNS="5",
               QUICKSTART_BACKBONE="smallcnn", QUICKSTART_FINETUNE="1",
               CNNEXPLAIN_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    p = subprocess.run(["bash", str(ROOT / "recipes" / "quickstart.sh"), str(out)], env=env,
                       capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stderr[-3000:]
    index = out / "report" / "index.html"
    assert p.stdout.strip().splitlines()[-1] == str(index)
    for method in ("std", "picnn", "cdcnn-r1p2"):
        run = out / method
        for f in ("checkpoint.pt", "best.pt", "train_log.csv", "entanglement.csv", "run.json"):
            assert (run / f).is_file(), (method, f)
        manifest = json.loads((run / "run.json").read_text())
        assert {"train-gated", "evaluate-entanglement"} <= set(manifest["commands"])
    for method in ("std", "picnn"):
        run = out / method
        for f in ("saliency/evaluation.csv", "saliency/grid.png", "dissect/tally.csv",
                  "dissect/summary.csv", "tcav/tcav.csv", "visualize/index.csv"):
            assert (run / f).is_file(), (method, f)
    # the gated runs start from std's trained network
    ft = json.loads((out / "picnn" / "run.json").read_text())["commands"]["train-gated"]
    assert ft["options"]["weights"] == str(out / "std" / "checkpoint.pt")
    summary = pd.read_csv(out / "report" / "summary.csv").set_index("run")
    assert list(summary.index) == ["std", "picnn", "cdcnn-r1p2"]
    for col in ("ACC1", "ACC3", "MIS"):
        assert summary[col].between(0, 1).all(), summary[col]
    assert summary.loc["picnn", "method"] == "picnn"
    html = index.read_text()
    for s in SECTIONS:
        assert f'id="{s}"' in html, s
    assert html.count("<h3>") >= 8
    assert _assert_pngs_decode(html) >= 10
    _check_in_browser(index, tmp_path)


def test_browser_check_runs_where_chromium_is_installed(tmp_path):
    """The HTML page in a real browser (skipped only where no Chromium is installed)."""
    if _chromium() is None:
        pytest.skip("no chromium on PATH (apt-get install chromium to run this check)")
    runs = [_fake_run(tmp_path / "runs", n, 0.7, 0.1 * i) for i, n in enumerate("abcde")]
    r = run_inproc("report", *runs, "--quiet")
    assert r.code == 0, r.err
    _check_in_browser(tmp_path / "runs" / "report" / "index.html", tmp_path)
