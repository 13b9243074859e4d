"""`vita-corpus export`: a stage in VITA-1.5's layout (and LLaVA's), read back both ways."""

import io
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from loader_rules import llava15_reads, vita_grid_tiles, vita_image_tokens, vita_load
from PIL import Image
from typer.testing import CliRunner

from flows.build.pipeline import build
from flows.cli import app
from flows.corpora.demo import make_demo_inputs
from flows.export.llava import llava_record
from flows.export.media import ExportError, MediaFiles, NotExported, grid_image
from flows.export.stage import export_stage
from flows.export.vita import (
    check_vita_export,
    merge_vita_configs,
    read_vita_config,
    turn_tokens,
    vita_config,
    vita_record,
)
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
    assert vita_grid_tiles(cols * 448, rows * 448) == n_tiles((cols, rows))  # VITA's own rule


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
    vita, note = vita_record(rec, members, MediaFiles(str(root / "audio" / "x"), "x", 3), "k")
    assert note is None
    assert sum(t["value"].count("<audio>") for t in vita["conversations"]) == len(vita["audio"])
    assert all((root / "audio" / p).is_file() for p in vita["audio"])


@settings(max_examples=100, deadline=None)
@given(layout=st.lists(st.integers(0, 3), min_size=1, max_size=5), data=st.data())
def test_the_export_decides_by_vitas_per_turn_count(layout, data):
    """Whatever the turns and tile counts, a record keeps its tiles exactly when VITA's
    per-turn expansion (written apart, from VITA's code) gives every image its own count."""
    n = sum(layout)
    tiles = data.draw(st.lists(st.sampled_from([1, 3, 5, 7, 13]), min_size=n, max_size=n))
    turns = []
    for k in layout:
        turns += [{"from": "human", "value": "<image>\n" * k + "Q?"}, {"from": "gpt", "value": "A."}]
    ours = turn_tokens(turns, tiles)
    try:
        exact = vita_image_tokens(turns, tiles) == tiles
    except IndexError:  # VITA runs out of images: never exact
        exact = False
    assert (ours == tiles) == exact
    assert vita_image_tokens(turns, [1] * n) == [1] * n  # the no-patch form always counts


def test_llava_leaves_out_a_placeholder_it_would_keep_as_text(tmp_path):
    rec = {"id": "p", "set": "s", "conversations": [
        {"from": "human", "value": "Say it."}, {"from": "gpt", "value": "Here: <image>"}],
        "meta": {"task": "text", "source": "s"}}
    with pytest.raises(NotExported, match="placeholder_not_in_format"):
        llava_record(rec, {}, MediaFiles(str(tmp_path), "", 1), "k")


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


def _meta_lines(dest: Path) -> dict[str, dict]:
    return {m["id"]: m for f in sorted((dest / "meta").rglob("*.jsonl"))
            for m in map(json.loads, f.read_text().splitlines())}


def _vita_records(dest: Path) -> tuple[dict, list[dict]]:
    conf = read_vita_config((dest / "dataset_config.py").read_text())
    entries = {id(e): e for es in conf["DataConfig"].values() for e in es}.values()
    return conf, [r for e in entries for r in json.loads(Path(e["chat_path"]).read_text())]


def test_every_stage_loads_in_vita_with_its_tiles_and_frames(demo, tmp_path):
    """All stages in one export, read by VITA's rules: each <image> gets its own image's tile
    count (per-turn rule), VITA's 3 fps sampling takes back every exported frame, and every
    path resolves from the one AudioFolder."""
    _, out = demo
    res = export_stage(str(out), "all", str(tmp_path / "v"), skip_validation=True)
    assert set(res.stage.split(",")) == {f"stage_{s}" for s in STAGES + ("1.1",)}
    assert check_vita_export(str(tmp_path / "v")) == []
    conf, records = _vita_records(tmp_path / "v")
    metas = _meta_lines(tmp_path / "v")
    assert len(records) == res.records > 0
    seen = Counter()
    for r in records:
        got = vita_load(r, conf)
        assert got["tokens"] == got["patch_num"], r["id"]  # tokens and pixel tensors agree
        meta = metas[r["id"]]
        if "image" in r:
            tiles = [im["tiles"] for im in meta["meta"]["tiling"]["images"]]
            if "export" in meta:  # VITA cannot tile these: one thumbnail each, said per record
                assert got["patch_num"] == [1] * len(tiles) and len(set(tiles)) > 1
                assert r["set"][0] in conf["NoPatchSets"]
                seen["no_patch"] += 1
            else:
                assert got["patch_num"] == tiles, r["id"]
                seen["tiled"] += 1
        if "video" in r:
            n = meta["meta"]["video"]["frames"]
            assert got["n_video_frames"] == n and got["frames"] == list(range(n)), r["id"]
            seen[f"video_{n}"] += 1
        seen["audio"] += len(got["audio"])
    assert {"no_patch", "tiled", "video_4", "video_8", "video_16", "audio"} <= set(seen), seen
    assert res.adjusted["no_patch_thumbnails"] == seen["no_patch"]


def test_stage_3_is_refused_for_vita(demo, tmp_path):
    _, out = demo
    with pytest.raises(ExportError, match="no speech-target training"):
        export_stage(str(out), "3.2", str(tmp_path / "x"))
    result = CliRunner().invoke(app, ["export", str(out), str(tmp_path / "y"), "--stage", "3.1",
                                      "--executor", "local"])
    assert result.exit_code == 2 and "speech-target" in result.output
    with pytest.raises(ExportError, match="only 2, 3 or 4 fps"):
        export_stage(str(out), "1.3", str(tmp_path / "z"), fps=1)


def test_two_exports_merge_into_one_vita_config(demo, tmp_path):
    """Two stages exported apart with one --media-root: their config lines go into one VITA
    config (no set key shared, one AudioFolder) and every record of both resolves."""
    _, out = demo
    media = tmp_path / "media"
    for s in ("1.3", "2.2"):
        export_stage(str(out), s, str(tmp_path / s), media_root=str(media))
    confs = [read_vita_config((tmp_path / s / "dataset_config.py").read_text()) for s in ("1.3", "2.2")]
    assert not set(confs[0]["FolderDict"]) & set(confs[1]["FolderDict"])
    merged = merge_vita_configs(confs)
    assert merged["AudioFolder"] == str(media) and len(merged["DataConfig"]) == 2
    kinds = Counter()
    for entries in merged["DataConfig"].values():
        for e in entries:
            for r in json.loads(Path(e["chat_path"]).read_text()):
                got = vita_load(r, merged)
                assert got["tokens"] == got["patch_num"]
                kinds.update(k for k in ("image", "video", "audio") if k in r)
    assert kinds["image"] and kinds["video"] and kinds["audio"], kinds
    export_stage(str(out), "2.2", str(tmp_path / "alone"))  # its own AudioFolder: not mergeable
    alone = read_vita_config((tmp_path / "alone" / "dataset_config.py").read_text())
    with pytest.raises(ExportError, match="same --media-root"):
        merge_vita_configs([confs[0], alone])


HOSTILE = "demo'\nimport os; os.system('touch PWNED')  # \"\"\"\n"


def test_config_values_never_become_code(demo, tmp_path):
    """A corpus, source or set name carrying Python stays a string in dataset_config.py: the
    file parses to plain assignments only, and the export never runs it."""
    text = vita_config(f"/d/{HOSTILE}", [HOSTILE, "ok"], [HOSTILE],
                       [("VitaCorpus_x", f"/d/{HOSTILE}.json")], {HOSTILE: ["VitaCorpus_x"]})
    tree = __import__("ast").parse(text)
    assert all(type(n).__name__ == "Assign" for n in tree.body)
    assert not any(type(n).__name__ in ("Call", "Import") for n in __import__("ast").walk(tree))
    conf = read_vita_config(text)
    assert HOSTILE in conf["FolderDict"] and conf["NoPatchSets"] == [HOSTILE]
    assert conf["DataConfig"][HOSTILE][0]["chat_path"] == f"/d/{HOSTILE}.json"
    with pytest.raises(ValueError, match="not an assignment"):
        read_vita_config(text + "import os\n")

    _, out = demo  # the whole export, from an OUT whose corpus is named to run code
    import shutil

    copy = tmp_path / "out"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("stage_1.1", "stage_2.1a", "ingest"))
    cfg = (copy / "corpus.yaml").read_text()
    (copy / "corpus.yaml").write_text(cfg.replace("name: demo", f"name: {json.dumps(HOSTILE)}", 1))
    os.chdir(tmp_path)
    result = CliRunner().invoke(app, ["export", str(copy), str(tmp_path / "v"), "--stage", "2.2",
                                      "--executor", "local"])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "PWNED").exists()
    assert json.loads((tmp_path / "v" / "export.json").read_text())["corpus"] == HOSTILE
    assert read_vita_config((tmp_path / "v" / "dataset_config.py").read_text())["DataConfig"]


def test_vita_export_reads_back_as_the_same_samples(demo, tmp_path):
    root, out = demo
    dest = tmp_path / "vita"
    result = CliRunner().invoke(app, ["export", str(out), str(dest), "--stage", "1.3",
                                      "--stage", "2.2", "--executor", "local"])
    assert result.exit_code == 0, result.output
    conf, records = _vita_records(dest)
    assert all("meta" not in r for r in records)
    originals = {s: stage_records(out / f"stage_{s}") for s in ("1.3", "2.2")}
    assert sorted(r["id"] for r in records) == sorted(
        r["id"] for o in originals.values() for r, _ in o.values())

    # As our own `vita` reader reads it: the same samples, grids, frames and audio.
    again = tmp_path / "again"
    report = build(load_config(dest / "corpus.yaml"), str(again))
    assert report["totals"]["rejected"] == 0, report["sources"]
    back = stage_records(again / "ingest")
    for s, original in originals.items():
        for key, (rec, _) in original.items():
            got, got_members = back[f"stage_{s.replace('.', '_')}_{key}"]
            assert got["id"] == rec["id"] and got["conversations"] == rec["conversations"]
            images = (rec["meta"].get("tiling") or {}).get("images", [])
            grids = [i["grid"] for i in images]
            nopatch = "/nopatch" in str(got["set"])
            assert [i["grid"] for i in (got["meta"].get("tiling") or {}).get("images", [])] == (
                [[1, 1]] * len(grids) if nopatch else grids)
            if not nopatch:
                assert sum(n.startswith("tile_") for n in got_members) == sum(
                    n_tiles(tuple(g)) for g in grids)
            if frames := (rec["meta"].get("video") or {}).get("frames"):
                # n frames at VITA's 3 fps last n/3 s, and our rule samples that duration again
                seconds = frames / 3
                want = 4 if seconds < 4 else int(seconds)
                assert got["meta"]["video"]["frames"] == want, (frames, got["meta"]["video"])
            assert len(got.get("audio") or []) == len(rec.get("audio") or [])


def test_llava_15_holds_only_what_it_reads(demo, tmp_path):
    _, out = demo
    res = export_stage(str(out), ["1.3", "2.2"], str(tmp_path / "l"), "llava")
    assert res.skipped == {"multi_image_not_in_format": 1, "video_not_in_format": 3}
    skips = [json.loads(x) for x in (tmp_path / "l" / "skipped.jsonl").read_text().splitlines()]
    assert Counter(x["reason"] for x in skips) == res.skipped
    metas = {m["id"]: m for s in ("stage_1.3", "stage_2.2")
             for m in map(json.loads, (tmp_path / "l" / f"{s}.meta.jsonl").read_text().splitlines())}
    n = 0
    for s in ("stage_1.3", "stage_2.2"):
        for r in json.loads((tmp_path / "l" / f"{s}.json").read_text()):
            assert llava15_reads(r), r
            if "image" in r:
                assert (tmp_path / "l" / r["image"]).is_file()
            human = " ".join(t["value"] for t in r["conversations"] if t["from"] == "human")
            for q in (metas[r["id"]]["meta"].get("speech") or {}).get("questions", []):
                assert q["text"] in human
            n += 1
    assert n == res.records > 0
    asr = export_stage(str(out), "2.1a", str(tmp_path / "l21"), "llava")
    assert asr.records == 0 and asr.skipped["audio_not_in_format"] == 8


def test_llava_onevision_writes_image_lists_and_videos(demo, tmp_path):
    """LLaVA-NeXT/OneVision: `image` a list with one <image> each; `video` under --video_folder
    with one <image> for it, at 1 fps so its --video_fps 1 takes every frame."""
    from decord import VideoReader, cpu

    _, out = demo
    res = export_stage(str(out), "1.3", str(tmp_path / "o"), "llava", llava_version="onevision")
    assert not res.skipped
    records = json.loads((tmp_path / "o" / "stage_1.3.json").read_text())
    lists = videos = 0
    for r in records:
        text = "".join(t["value"] for t in r["conversations"])
        assert "<video>" not in text and "<audio>" not in text
        if isinstance(r.get("image"), list):
            assert text.count("<image>") == len(r["image"]) > 1
            assert all((tmp_path / "o" / p).is_file() for p in r["image"])
            lists += 1
        if "video" in r:
            assert text.count("<image>") == 1
            vr = VideoReader(str(tmp_path / "o" / r["video"]), ctx=cpu(0))
            assert round(vr.get_avg_fps()) == 1 and len(vr) in (4, 8, 16)
            videos += 1
    assert lists == 1 and videos == 3


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "export.json"}


@pytest.mark.slow
def test_export_on_ray_workers_writes_the_same_bytes(demo, tmp_path):
    """Shards exported as Ray tasks on two workers, merged in order: byte for byte the
    one-process export (export.json differs only by its time), progress reported throughout."""
    from flows.build.ray_exec import RayDataExecutor

    _, out = demo
    local = export_stage(str(out), ["1.3", "2.2"], str(tmp_path / "one"))
    seen: list[tuple[int, int]] = []
    ex = RayDataExecutor(num_cpus=2)
    try:
        ray = export_stage(str(out), ["1.3", "2.2"], str(tmp_path / "ray"), executor=ex,
                           progress=lambda done, total: seen.append((done, total)))
    finally:
        ex.close()
    assert ray.records == local.records and ray.by_source == local.by_source
    one, two = _tree(tmp_path / "one"), _tree(tmp_path / "ray")
    assert one.keys() == two.keys() and len(one) > 20
    different = [k for k in one if k != "dataset_config.py" and k != "corpus.yaml" and one[k] != two[k]]
    assert different == []
    # the configs name their own DEST; otherwise the same text
    for k in ("dataset_config.py", "corpus.yaml"):
        assert one[k].replace(b"/one", b"/ray") == two[k]
    assert seen[-1] == (local.records, local.records)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
