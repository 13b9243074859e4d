"""`vita-corpus export`: a stage in VITA-1.5's layout (and LLaVA's), read back both ways."""

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from flows.build.pipeline import build
from flows.cli import app
from flows.corpora.demo import make_demo_inputs
from flows.export.llava import llava_record
from flows.export.media import ExportError, MediaFiles, grid_image
from flows.export.stage import export_stage
from flows.export.vita import check_vita_export, vita_record
from flows.validation.gate import validate
from schemas.config import load_config
from schemas.recipes import DEFAULT_RECIPES
from storage.shards import iter_samples
from transforms.tiling import n_tiles, target_ratios, tile_grid

STAGES = ("1.3", "2.1a", "2.2")


def stage_records(folder: Path) -> dict[str, tuple[dict, dict[str, bytes]]]:
    out = {}
    for tar in sorted(folder.glob("*.tar")):
        for key, members in iter_samples(str(tar)):
            out[key] = (json.loads(members["json"]), members)
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo corpus with the stages an export needs (images, video, speech), validated;
    stage 1.1 is built but left unvalidated."""
    root = tmp_path_factory.mktemp("export")
    cfg = load_config(make_demo_inputs(root / "in"))
    recipes = [r for r in DEFAULT_RECIPES if r.stage in STAGES + ("1.1",)]
    out = root / "out"
    build(cfg, str(out), stages=recipes)
    verdicts = validate(str(out), None)
    assert all(verdicts[f"stage_{s}"]["passed"] for s in STAGES), verdicts
    (out / "validation" / "stage_1.1.verdict.json").unlink()
    return root, out


@pytest.mark.parametrize("grid", target_ratios(1, 12), ids=lambda g: f"{g[0]}x{g[1]}")
def test_a_pasted_grid_image_tiles_back_to_its_grid(grid):
    """VITA re-tiles what we export: the (cols*448, rows*448) image must choose the same grid,
    for every grid the tiler can choose (exhaustive: there are 35 of them)."""
    cols, rows = grid
    assert tile_grid(cols * 448, rows * 448) == (cols, rows)


def test_grid_image_puts_each_tile_where_it_was_cut():
    tiles = {}
    for i in range(6):
        buf = io.BytesIO()
        Image.new("RGB", (448, 448), (40 * i, 255 - 40 * i, 7 * i)).save(buf, "JPEG", quality=95)
        tiles[f"tile_{i:02d}.jpg"] = buf.getvalue()
    im = np.asarray(Image.open(io.BytesIO(grid_image(tiles, sorted(tiles), 3, 2, 448))))
    assert im.shape == (896, 1344, 3)
    for i in range(6):
        r, c = divmod(i, 3)
        centre = im[r * 448 + 224, c * 448 + 224].astype(int)
        assert np.abs(centre - [40 * i, 255 - 40 * i, 7 * i]).max() <= 6, (i, centre)


def _record(turns, n_audio, spoken):
    names = [f"audio_{i:02d}.flac" for i in range(n_audio)]
    meta = {"task": "qa", "source": "s", "members": {"audio": names}}
    if spoken:
        meta["speech"] = {"questions": [{"member": n, "text": t} for n, t in zip(names, spoken, strict=True)]}
    return {"id": "x", "set": "s", "audio": [f"tts/{i}.flac" for i in range(n_audio)],
            "conversations": turns, "meta": meta}, {n: b"fLaC" for n in names}


question = st.text(st.characters(codec="utf-8", exclude_characters="<>\x00"), min_size=1,
                   max_size=40).filter(str.strip)


@settings(max_examples=60, deadline=None)
@given(questions=st.lists(question, min_size=1, max_size=4), data=st.data())
def test_llava_puts_every_spoken_question_back_in_order(tmp_path_factory, questions, data):
    """Whatever the turns, LLaVA gets each question's own text where its <audio> stood, and
    VITA keeps the placeholders with one audio path each."""
    pres = [data.draw(st.sampled_from(["", "Look. ", "Listen:\n"])) for _ in questions]
    turns = []
    for pre, q in zip(pres, questions, strict=True):
        turns += [{"from": "human", "value": f"{pre}<audio>\n"}, {"from": "gpt", "value": f"A: {q}"}]
    rec, members = _record(turns, len(questions), questions)
    root = tmp_path_factory.mktemp("llava")
    out = llava_record(rec, members, MediaFiles(str(root), "", 1), "k")
    humans = [t["value"] for t in out["conversations"] if t["from"] == "human"]
    assert humans == [f"{pre}{q}\n" for pre, q in zip(pres, questions, strict=True)]
    vita = vita_record(rec, members, MediaFiles(str(root), "audio", 1), "k")
    assert sum(t["value"].count("<audio>") for t in vita["conversations"]) == len(vita["audio"])
    assert all((root / "audio" / p).is_file() for p in vita["audio"])


def test_an_unvalidated_stage_is_refused_unless_skipped(demo, tmp_path):
    _, out = demo
    with pytest.raises(ExportError, match="has not been validated.*--skip-validation"):
        export_stage(str(out), "1.1", str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()
    res = export_stage(str(out), "1.1", str(tmp_path / "x"), skip_validation=True)
    manifest = json.loads((tmp_path / "x" / "export.json").read_text())
    assert manifest["validation"].startswith("skipped") and res.records == manifest["records"] > 0
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an earlier export"):
        export_stage(str(out), "2.2", str(tmp_path / "y"))


@pytest.mark.parametrize("stage", ["1.3", "2.2"])
def test_vita_export_reads_as_vita_records_and_back_as_the_same_samples(demo, tmp_path, stage):
    root, out = demo
    dest = tmp_path / "vita"
    result = CliRunner().invoke(app, ["export", "--stage", stage, str(out), str(dest),
                                      "--format", "vita"])
    assert result.exit_code == 0, result.output
    assert check_vita_export(str(dest)) == []
    original = stage_records(out / f"stage_{stage}")

    # As VITA's loader reads it: set -> folder, paths under it, audio under AudioFolder/audio.
    conf: dict = {}
    exec((dest / "dataset_config.py").read_text(), conf)
    (entries,) = conf["DataConfig"].values()
    records = [r for e in entries for r in json.loads(Path(e["chat_path"]).read_text())]
    assert sorted(r["id"] for r in records) == sorted(r["id"] for r, _ in original.values())
    kinds = set()
    for r in records:
        images = r.get("image") or []
        images = [images] if isinstance(images, str) else images
        sets = r["set"] if isinstance(r["set"], list) else [r["set"]] * max(1, len(images))
        text = "".join(t["value"] for t in r["conversations"])
        assert text.count("<image>") == len(images) and text.count("<audio>") == len(r.get("audio", []))
        assert text.count("<video>") == (1 if r.get("video") else 0)
        assert "meta" not in r
        for s, p in zip(sets, images, strict=False):
            w, h = Image.open(os.path.join(conf["FolderDict"][s], p)).size
            assert w % 448 == 0 and h % 448 == 0
            kinds.add("image")
        if r.get("video"):
            assert os.path.getsize(os.path.join(conf["FolderDict"][sets[0]], r["video"])) > 0
            kinds.add("video")
        for p in r.get("audio", []):
            assert os.path.getsize(os.path.join(conf["AudioFolder"], "audio", p)) > 0
            kinds.add("audio")
    assert kinds >= ({"image", "video"} if stage == "1.3" else {"image", "audio"})
    meta_lines = [json.loads(x) for f in sorted((dest / "meta").glob("*.jsonl"))
                  for x in f.read_text().splitlines()]
    assert {m["id"] for m in meta_lines} == {r["id"] for r in records}

    # As our own `vita` reader reads it: the same samples, grids, frames and audio.
    again = tmp_path / "again"
    report = build(load_config(dest / "corpus.yaml"), str(again))
    assert report["totals"]["rejected"] == 0, report["sources"]
    back = stage_records(again / "ingest")
    assert sorted(back) == sorted(original)
    for key, (rec, _) in original.items():
        got, got_members = back[key]
        assert got["id"] == rec["id"] and got["conversations"] == rec["conversations"]
        grids = [i["grid"] for i in (rec["meta"].get("tiling") or {}).get("images", [])]
        assert [i["grid"] for i in (got["meta"].get("tiling") or {}).get("images", [])] == grids
        assert sum(n.startswith("tile_") for n in got_members) == sum(
            n_tiles(tuple(g)) for g in grids)
        frames = (rec["meta"].get("video") or {}).get("frames")
        assert (got["meta"].get("video") or {}).get("frames") == frames
        assert len(got.get("audio") or []) == len(rec.get("audio") or [])
        if not isinstance(rec.get("image"), list):  # our reader keeps a list `set` as text
            assert got["set"] == rec["set"]


def test_llava_export_speaks_text_and_skips_audio_it_cannot_hold(demo, tmp_path):
    _, out = demo
    res = export_stage(str(out), "2.2", str(tmp_path / "l22"), "llava")
    records = json.loads((tmp_path / "l22" / "stage_2.2.json").read_text())
    assert res.records == len(records) > 0 and not res.skipped
    spoken = [json.loads(x) for x in (tmp_path / "l22" / "stage_2.2.meta.jsonl").read_text().splitlines()]
    texts = {m["id"]: [q["text"] for q in (m["meta"].get("speech") or {}).get("questions", [])]
             for m in spoken}
    assert any(texts.values())
    for r in records:
        human = " ".join(t["value"] for t in r["conversations"] if t["from"] == "human")
        assert "<audio>" not in human and all(t in human for t in texts[r["id"]])
        assert (tmp_path / "l22" / r["image"]).is_file()
    asr = export_stage(str(out), "2.1a", str(tmp_path / "l21"), "llava")
    assert asr.records == 0 and asr.skipped["audio_not_in_format"] == 6
    lines = (tmp_path / "l21" / "skipped.jsonl").read_text().splitlines()
    assert {json.loads(x)["reason"] for x in lines} == {"audio_not_in_format"}
