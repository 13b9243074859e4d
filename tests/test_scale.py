"""The scale corpus (flows/corpora/scale.py) and reading a stage back with Ray Data's own reader."""

from __future__ import annotations

import json
from pathlib import Path

from flows.build.pipeline import build
from flows.corpora.scale import counts, make_scale_inputs
from schemas.config import load_config
from schemas.recipes import DEFAULT_RECIPES
from storage.parts import iter_manifests
from storage.readers import read_source

from conftest import make_caption_corpus


def test_counts_give_every_kind_and_add_up():
    for n in (10, 2_500, 1_000_000):
        c = counts(n)
        assert sum(c.values()) == n and min(c.values()) >= 1
    assert c["text"] > c["caption"] > c["qa"] > c["video"] == 20_000


def test_the_scale_corpus_has_every_format_task_language_and_bad_input(tmp_path):
    cfg_path = make_scale_inputs(tmp_path / "a", 2_500, max_samples=200)
    again = make_scale_inputs(tmp_path / "b", 2_500, max_samples=200)
    for name in ("text.json", "caption.json", "qa_vita.json", "ocr.jsonl", "asr.jsonl",
                 "pairs.txt", "video.json"):  # the same seed gives the same bytes
        assert (tmp_path / "a" / name).read_bytes() == (again.parent / name).read_bytes()
    cfg = load_config(cfg_path)
    assert {s.kind for s in cfg.sources} == {"text", "caption", "qa", "ocr", "video", "asr",
                                             "tts_pair"}
    assert sum(1 for s in cfg.sources for _ in read_source(s)) == 2_500
    # Images are shared: a few hundred files behind many records.
    assert len(list((tmp_path / "a" / "media" / "images").glob("*.jpg"))) < 200
    cfg.transforms.speech.enabled = False  # the ingest pool; speech is stage 2.2's
    report = build(cfg, str(tmp_path / "out"))
    assert report["accounted"] and report["totals"]["inputs"] == 2_500
    src = report["sources"]
    assert src["scale_text"]["reject_reasons"] == {"duplicate_id": 1, "malformed_json": 1}
    assert src["scale_caption"]["reject_reasons"] == {"missing_media": 1}
    assert src["scale_vqa"]["reject_reasons"] == {"placeholder_mismatch": 1}
    for name in ("scale_text", "scale_caption", "scale_vqa"):
        assert set(src[name]["languages"]) == {"en", "zh"}
    assert src["scale_video"]["members"]["frame"] >= 4 * src["scale_video"]["written"]
    assert src["scale_asr"]["members"]["audio"] == src["scale_asr"]["written"] == 100
    assert src["scale_pairs"]["written"] == 25
    # The duplicate repeats an id from another range (of 200 inputs) than its own.
    rej = [json.loads(line) for f in (tmp_path / "out" / "rejects").glob("scale_text-*")
           for line in f.read_text().splitlines()]
    dup = next(r for r in rej if r["reason"] == "duplicate_id")
    assert "input 49" in dup["detail"] and dup["index"] == 699


def test_ray_data_read_webdataset_reads_every_sample_of_a_stage(tmp_path, ray_executor):
    import ray.data

    cfg = load_config(make_caption_corpus(tmp_path / "in", 30, max_samples=4, bad_every=7))
    out = tmp_path / "out"
    build(cfg, str(out), stages=[r for r in DEFAULT_RECIPES if r.stage in ("1.1", "1.2")],
          executor=ray_executor)
    for stage in ("stage_1.1", "stage_1.2"):
        expected = {s.key: s for m in iter_manifests(str(out), stage) for s in m.samples}
        ds = ray.data.read_webdataset(str(out / stage), file_extensions=["tar"], decoder=None)
        rows = ds.take_all()
        assert sorted(r["__key__"] for r in rows) == sorted(expected)
        for r in rows:
            rec = json.loads(r["json"])
            assert rec["id"] == expected[r["__key__"]].id
            assert all(r.get(m) for m in expected[r["__key__"]].members)
    assert len(expected) == 26  # stage 1.2: every caption that has its image
    assert Path(out / "stage_1.2" / "_stage.json").exists()  # read past, not as a shard


def _human_turns(path: Path) -> list[str]:
    """The questions of a generated JSON array (one element a line; the malformed ones left
    out)."""
    turns = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line.rstrip(","))
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            turns += [t["value"] for t in rec["conversations"] if t["from"] == "human"]
    return turns


def test_scale_questions_differ_by_default_and_the_flag_keeps_the_pool(tmp_path):
    make_scale_inputs(tmp_path / "diff", 600)
    make_scale_inputs(tmp_path / "pool", 600, question_pool=True)
    for name in ("text.json", "caption.json", "qa_vita.json"):
        diff, pool = _human_turns(tmp_path / "diff" / name), _human_turns(tmp_path / "pool" / name)
        assert len(diff) > 50 and len(set(diff)) == len(diff), name  # every question its own
        assert len(set(pool)) <= 25, name  # the small pool: a warm cache serves them all
