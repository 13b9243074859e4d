"""The morning view: verdicts, the sample gallery and the build history in the report, checked
in headless Chromium; Data Docs that open with the network off; tables in narrow terminals."""

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from flows.cli import app
from flows.corpora.demo import make_demo_inputs
from flows.report.datadocs import ASSETS, OfflineResult, rewrite_page, site_root
from flows.report.gallery import _PRIORITY, Picker, kind_of, rank
from flows.report.history import append_row, load_history
from flows.report.mix import read_verdicts
from flows.report.page import render_verdicts
from flows.report.tables import Col, print_table, render_plain

from conftest import screenshot

OFFLINE = ["--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=http://127.0.0.1:9"]
PROBE = """<script>
window.addEventListener('load', () => {
  const auds = [...document.querySelectorAll('audio')];
  const res = new Array(auds.length).fill(null);
  let left = auds.length;
  const finish = () => document.body.setAttribute('data-probe', JSON.stringify({
      audio: res, images: [...document.images].map(i => i.naturalWidth)}));
  if (!left) finish();
  auds.forEach((a, i) => {
    const done = (v) => { if (res[i] === null) { res[i] = v; if (--left === 0) finish(); } };
    a.addEventListener('loadedmetadata', () => done(a.duration));
    a.addEventListener('error', () => done(-1));
    a.load();
  });
});
</script>"""


def chromium_dom(page: Path, tmp: Path, *flags: str) -> str:
    """The page's DOM after its scripts ran, from Debian's headless Chromium."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is needed: `make chromium` installs it"
    run = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update",
                          "--disable-sync", f"--user-data-dir={tmp / 'dom-profile'}",
                          "--virtual-time-budget=15000", *flags, "--dump-dom",
                          page.resolve().as_uri()],
                         check=True, capture_output=True, timeout=120)
    return run.stdout.decode()


def stage_sections(page: str) -> dict[str, str]:
    """The HTML of each stage's section of the report, by stage folder name."""
    parts = re.split(r"<section id='", page)[1:]
    return {p.split("'", 1)[0]: p for p in parts}


def grow_text_source(inputs: Path, n: int) -> None:
    path = inputs / "text_llava.json"
    recs = json.loads(path.read_text(encoding="utf-8"))
    recs += [{"id": f"txt_more_{len(recs) + i}", "conversations": [
        {"from": "human", "value": f"What is {i} plus {len(recs)}?"},
        {"from": "gpt", "value": f"It is {i + len(recs)}."}]} for i in range(n)]
    path.write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")


@pytest.fixture(scope="module")
def nightly(tmp_path_factory):
    """Three builds of the demo corpus into one OUT, its text source growing between them (a
    nightly build); only the last is validated. Returns the folders and what the report said
    after the first build."""
    root = tmp_path_factory.mktemp("nightly")
    cfg = make_demo_inputs(root / "in")
    out = root / "out"
    runner = CliRunner()
    first = {}
    for night in range(3):
        args = ["build", "-c", str(cfg), "-o", str(out), "--executor", "local", "-q"]
        result = runner.invoke(app, args + ([] if night == 2 else ["--no-validate"]))
        assert result.exit_code == 0, result.output
        if night == 0:
            first = {"mix": json.loads((out / "report" / "data_mix.json").read_text()),
                     "html": (out / "report" / "index.html").read_text()}
        grow_text_source(root / "in", 2)
    return root, out, first


def test_before_validation_every_stage_says_not_validated(nightly):
    _, out, first = nightly
    stages = sorted(p.name for p in out.glob("stage_*"))
    assert len(stages) == 8
    assert {s: v["status"] for s, v in first["mix"]["verdicts"].items()} == {
        s: "not validated" for s in stages}
    sections = stage_sections(first["html"])
    for s in stages:
        assert "verdict v-none'>not validated<" in sections[s], s


def test_report_holds_every_stage_verdict_with_its_data_docs(nightly):
    _, out, _ = nightly
    mix = json.loads((out / "report" / "data_mix.json").read_text())
    stages = sorted(p.name for p in out.glob("stage_*"))
    assert sorted(mix["verdicts"]) == stages
    page = (out / "report" / "index.html").read_text()
    rows = dict(re.findall(r"<tr class='verdict-row' data-stage='([^']+)'>(.*?)</tr>", page))
    assert sorted(rows) == stages
    for s in stages:
        v = mix["verdicts"][s]
        assert v["status"] == "passed" and v["expectations"] > 0, (s, v)
        assert "verdict v-passed'>passed<" in rows[s]
        assert {"index", "samples", "shards"} <= set(v["docs"]), v["docs"]
        for href in v["docs"].values():
            assert (out / "report" / href).resolve().is_file(), href
            assert f"href='{html.escape(href)}'" in rows[s]


def test_gallery_plays_audio_and_shows_tiles_and_frames_in_chromium(nightly, tmp_path):
    _, out, _ = nightly
    report = out / "report"
    mix = json.loads((report / "data_mix.json").read_text())
    page = (report / "index.html").read_text()
    sections = stage_sections(page)
    probe = report / "_probe.html"  # the report plus a script that reports what loaded
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    try:
        dom = chromium_dom(probe, tmp_path)
    finally:
        probe.unlink()
    found = re.search(r'data-probe="([^"]*)"', dom)
    assert found, "the probe script did not finish"
    loaded = json.loads(html.unescape(found.group(1)))
    assert loaded["audio"] and all(d and d > 0 for d in loaded["audio"]), loaded["audio"]
    assert loaded["images"] and all(w > 0 for w in loaded["images"])
    for stage, figures in mix["stages"].items():
        if stage == "ingest":
            continue
        sec = sections[stage]
        srcs = re.findall(r'<audio controls preload="metadata" src="([^"]+)"', sec)
        if figures["audio_hours"] > 0:
            assert srcs, f"{stage} has audio but its gallery plays none"
            for src in srcs:
                info = sf.info(str(report / src))
                assert info.duration > 0 and info.samplerate in (16000, 24000)
        if figures["tiles_per_image"]:
            grids = re.findall(r"grid-template-columns:repeat\((\d+),", sec)
            assert grids, f"{stage} has images but its gallery shows no tile grid"
            tiles = re.findall(r'<img class="tile" src="([^"]+)"', sec)
            assert all((report / t).is_file() for t in tiles)
        if figures["frames_per_video"]:
            frames = re.findall(r'<div class="frame"><img src="([^"]+)"', sec)
            assert len(frames) >= 4 and all((report / f).is_file() for f in frames)
    spoken = stage_sections(page)["stage_2.2"]
    assert "spoken question: \u201c" in html.unescape(spoken)
    assert mix["gallery"]["seed"] == 1234 and mix["gallery"]["stages"]["stage_1.3"]
    # Seen as a person sees it: verdict badges at the top, the gallery further down.
    png = screenshot(report / "index.html", tmp_path / "report.png", (1280, 2400))
    arr = np.asarray(Image.open(png).convert("RGB")).astype(int)
    green = np.all(np.abs(arr[:700] - [0x10, 0x96, 0x18]) < 8, axis=-1).sum()
    assert green > 8 * 150, green  # eight "passed" badges


def test_history_plots_three_builds(nightly):
    _, out, _ = nightly
    hist = out / "report" / "history.jsonl"
    rows = [json.loads(x) for x in hist.read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["build", "build", "build", "validation"]
    builds = load_history(str(hist), "demo")
    assert len(builds) == 3 and "validation" in builds[-1] and "validation" not in builds[0]
    assert [b["stages"]["ingest"]["samples"] for b in builds] == [40, 42, 44]
    assert all(0 < b["stages"]["ingest"]["reject_rate"] < 1 for b in builds)
    assert builds[-1]["stages"]["stage_2.2"]["spoken_fraction"] is not None
    page = (out / "report" / "index.html").read_text()
    assert "History: the last 3 builds" in page
    ingest = re.findall(r'<polyline class="series" data-stage="ingest"[^>]* points="([^"]+)"', page)
    assert len(ingest) == 3  # samples, tokens, reject rate (spoken fraction: stage 2.2 only)
    ys = [float(p.split(",")[1]) for p in ingest[0].split()]
    assert len(ys) == 3 and ys[0] > ys[1] > ys[2]  # more samples each night: higher up
    mix = json.loads((out / "report" / "data_mix.json").read_text())
    assert mix["history"] == {"path": str(hist), "builds": 3}


entry = st.fixed_dictionaries({
    "id": st.text("abc123", min_size=1, max_size=6), "tiles": st.sampled_from([[], [5], [1, 13]]),
    "frames": st.sampled_from([0, 0, 8]), "audio_s": st.sampled_from([[], [], [1.5]])})


@settings(max_examples=80, deadline=None)
@given(entries=st.lists(entry, max_size=60, unique_by=lambda e: e["id"]),
       k=st.integers(0, 6), seed=st.integers(0, 2**31))
def test_the_gallery_picks_the_best_ranked_of_each_kind_then_the_rest(entries, k, seed):
    """The streaming picker chooses exactly what ranking every sample would: the best-ranked
    sample of each kind (in the order kinds are shown), then the best-ranked others, k in all;
    and the choice does not depend on the order the manifests are read in."""
    samples = [dict(e, key=f"src-{e['id']}") for e in entries]
    picker, backwards = Picker(seed, "stage_2.2", k), Picker(seed, "stage_2.2", k)
    for s in samples:
        picker.offer("a.tar", s)
    for s in reversed(samples):
        backwards.offer("a.tar", s)
    ranked = sorted(samples, key=lambda s: (rank(seed, "stage_2.2", s["key"]), s["key"]))
    best: dict[str, str] = {}
    for s in ranked:
        best.setdefault(kind_of(s), s["key"])
    want = [best[kind] for kind in _PRIORITY if kind in best][:k]
    want += [s["key"] for s in ranked if s["key"] not in want][: k - len(want)]
    assert sorted(p.key for p in picker.picks()) == sorted(want)
    assert [p.key for p in backwards.picks()] == [p.key for p in picker.picks()]


def test_verdicts_are_read_whatever_fields_they_carry(tmp_path):
    (tmp_path / "validation").mkdir()
    (tmp_path / "validation" / "stage_2.2.verdict.json").write_text(json.dumps({
        "stage": "stage_2.2", "passed": False, "a_field_from_later": {"x": 1},
        "failed": [{"expectation": "expect_column_values_to_be_in_set", "column": "members_ok",
                    "grain": "shard"}, "a plain label"],
        "quarantined": [{"shard": "demo_ocr-00001.tar", "failed": ["x"]}, "old-00002.tar"],
        "shards": {"demo_ocr-00000.tar": "aa"}}))
    (tmp_path / "validation" / "stage_1.1.verdict.json").write_text("{not json")
    stages = ["stage_2.2", "stage_1.1", "stage_3.1"]
    v = read_verdicts(str(tmp_path), stages, {"stage_2.2": {"demo_ocr-00000.tar": "aa"}})
    assert [v[s]["status"] for s in stages] == ["failed", "unreadable verdict", "not validated"]
    assert v["stage_2.2"]["failed"] == ["expect_column_values_to_be_in_set(members_ok)",
                                        "a plain label"]
    assert v["stage_2.2"]["quarantined"] == ["demo_ocr-00001.tar", "old-00002.tar"]
    assert v["stage_2.2"]["samples"] is None and v["stage_2.2"]["docs"] == {}
    page = render_verdicts(v)
    assert "v-failed'>failed<" in page and "v-none'>not validated<" in page
    # The shards changed after the verdict (rebuilt, or one more added): out of date.
    for now in ({"demo_ocr-00000.tar": "bb"}, {"demo_ocr-00000.tar": "aa", "new-00000.tar": "cc"}):
        again = read_verdicts(str(tmp_path), ["stage_2.2"], {"stage_2.2": now})
        assert again["stage_2.2"]["status"] == "out of date"


def test_history_skips_a_torn_line_and_other_corpora(tmp_path):
    path = str(tmp_path / "h.jsonl")
    for i, corpus in enumerate(["a", "b", "a"]):
        append_row(path, {"kind": "build", "build": f"{i}|x", "corpus": corpus,
                          "started": f"2026-01-0{i + 1}", "stages": {}})
    with open(path, "a") as f:
        f.write('{"kind": "build", "build": "3|x", "corp')  # a crash mid-row
    assert [b["build"] for b in load_history(path, "a")] == ["0|x", "2|x"]
    append_row(path, {"kind": "build", "build": "4|x", "corpus": "a", "started": "2026-01-05",
                      "stages": {}})  # appends after the torn line still read
    assert [b["build"] for b in load_history(path, "a")] == ["0|x", "2|x", "4|x"]


def test_data_docs_list_the_validations_with_the_network_off(nightly, tmp_path):
    _, out, _ = nightly
    root = Path(site_root(str(out)))
    index = root / "index.html"
    results = list((out / "validation" / "gx" / "uncommitted" / "validations").rglob("*.json"))
    assert len(results) >= 8 * 2
    for page in root.rglob("*.html"):
        text = page.read_text()
        assert not re.search(r"<script[^>]+src=[\"']https?://", text), page
        assert not re.search(r"<link[^>]+stylesheet[^>]+href=[\"']https?://", text), page
    dom = chromium_dom(index, tmp_path, *OFFLINE)
    shown = re.search(r"Showing 1 to (\d+) of (\d+) rows", dom)
    assert shown and int(shown.group(2)) == len(results), shown
    for stage in (p.name for p in out.glob("stage_*")):
        assert stage in dom
    png = screenshot(index, tmp_path / "datadocs.png", (1280, 900))
    arr = np.asarray(Image.open(png).convert("RGB")).astype(int)
    # Bootstrap and Font Awesome arrived: the status column's green check icons are drawn.
    green = np.all(np.abs(arr - [0x28, 0xa7, 0x45]) < 12, axis=-1).sum()
    assert green > 200, green
    # Baseline: without the local copies the same page shows no table at all.
    vendor = root / "static" / "vendor"
    vendor.rename(root / "static" / "vendor-away")
    try:
        bare = chromium_dom(index, tmp_path, *OFFLINE)
    finally:
        (root / "static" / "vendor-away").rename(vendor)
    assert "Showing 1 to" not in bare


def test_every_cdn_asset_of_the_gx_templates_has_a_local_copy(tmp_path):
    import great_expectations

    templates = Path(great_expectations.__file__).parent / "render" / "view" / "templates"
    res = OfflineResult()
    for name in ("index_page.j2", "page.j2", "page_minimal.j2", "js_script_imports.j2"):
        text = (templates / name).read_text()
        new = rewrite_page(text, tmp_path, tmp_path, res)
        assert not re.search(r"<script[^>]+src=[\"']https?://", new), name
        assert not re.search(r"<link[^>]+stylesheet[^>]+href=[\"']https?://", new), name
        assert "integrity=" not in new and "crossorigin" not in new
    assert not res.unmapped and res.rewritten > 20
    assert (ASSETS / "NOTICE.md").is_file() and len(list(ASSETS.rglob("*.woff2"))) == 4


def test_tables_stay_readable_when_narrow_and_in_logs(nightly):
    cols = [Col("stage"), Col("verdict"), Col("failed expectations"), Col("samples", True)]
    rows = [["stage_2.1b", "passed", "expect_column_values_to_be_between(audio_min_s)", "1,234"],
            ["stage_3.2", "FAIL", "-", "7"]]
    plain = render_plain("t", cols, rows)
    assert "expect_column_values_to_be_between(audio_min_s)" in plain and "1,234" in plain
    assert plain.splitlines()[1].split() == ["stage", "verdict", "failed", "expectations", "samples"]
    for width in (40, 60, 100):
        con = Console(width=width, force_terminal=True, record=True, color_system=None)
        print_table(con, "t", cols, rows)
        text = con.export_text()
        assert max(len(line) for line in text.splitlines()) <= width
        for word in ("stage_2.1b", "stage_3.2", "passed", "1,234", "samples", "verdict"):
            assert word in text, (width, word, text)  # never cut to "st…" or one letter
    _, out, _ = nightly
    result = CliRunner().invoke(app, ["report", str(out)])  # not a terminal: a log
    assert result.exit_code == 0, result.output
    head = next(line for line in result.output.splitlines() if line.startswith("stage "))
    assert head.split() == ["stage", "validation", "samples", "tokens", "audio", "h", "spoken",
                            "shards", "MB"]
    assert re.search(r"^stage_2\.2\s+passed\s+\d", result.output, re.M)
