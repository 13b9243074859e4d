import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import soundfile as sf
import webdataset as wds
import yaml
from PIL import Image
from typer.testing import CliRunner

from flows.build.pipeline import BuildError, build
from flows.cli import app
from schemas.config import load_config
from schemas.manifest import AccountingError
from storage.parts import PartWriter, list_manifests

from conftest import caption, make_caption_corpus

REPO = Path(__file__).resolve().parent.parent


def shard_ids(out: Path, stage: str = "ingest") -> list[str]:
    ids = []
    for tar in sorted((out / stage).glob("*.tar")):
        for s in wds.WebDataset(str(tar), shardshuffle=False):
            ids.append(json.loads(s["json"])["id"])
    return ids


def tree_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "ingest").glob("*.tar"))}


def test_demo_build_accounts_for_every_input(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    report = json.loads((out / "report" / "build_report.json").read_text())
    assert report["accounted"] is True
    src = report["sources"]
    assert set(src) == {"demo_caption", "demo_vqa", "demo_ocr", "demo_video", "demo_text",
                        "demo_asr", "demo_librispeech", "demo_pairs", "demo_parquet_llava",
                        "demo_parquet_syndog", "demo_webdataset", "demo_messages", "demo_aishell"}
    # The three text-speech pairs, and the questions stage 2.2 speaks.
    assert report["tts"]["synthesis_calls"] == 3 + report["stages"]["2.2"]["tts"]["synthesis_calls"]
    # The demo builds every stage; 2.2 speaks some of its questions, the ingest pool none.
    assert sorted(report["stages"]) == ["1.1", "1.2", "1.3", "2.1a", "2.1b", "2.2", "3.1", "3.2"]
    mix = json.loads((out / "report" / "data_mix.json").read_text())
    assert mix["stages"]["stage_2.2"]["speech_questions"]["spoken"] > 0
    assert all(not s.get("speech_questions") for s in src.values())
    assert (out / "report" / "index.html").read_text().count("<svg") > 10
    for s in src.values():
        assert s["inputs"] == s["written"] + s["rejected"]
    assert src["demo_caption"]["reject_reasons"] == {
        "image_decode_error": 1, "malformed_json": 1, "missing_media": 1, "path_outside_root": 1}
    assert src["demo_ocr"]["reject_reasons"] == {"invalid_utf8": 1}
    assert src["demo_vqa"]["reject_reasons"] == {"placeholder_mismatch": 1}
    assert src["demo_asr"]["reject_reasons"] == {"malformed_json": 1}
    # The layouts datasets ship in: each source with its one broken input.
    shipped = {"demo_parquet_llava": (5, 4, "image_decode_error"),
               "demo_parquet_syndog": (3, 2, "missing_text"),
               "demo_webdataset": (4, 3, "missing_text"),
               "demo_messages": (4, 3, "unsupported_role"),
               "demo_aishell": (3, 2, "missing_media")}
    for name, (inputs, written, reason) in shipped.items():
        assert (src[name]["inputs"], src[name]["written"], src[name]["reject_reasons"]) == (
            inputs, written, {reason: 1}), name
    # 2.5 s, 8 s and 20 s clips: 4 + 8 + 16 frames by the paper's rule.
    assert src["demo_video"]["members"] == {"frame": 28, "json": 3}
    assert src["demo_caption"]["languages"] == {"en": 5, "zh": 1}
    # What the report claims is what the shards and the reject store hold.
    assert len(shard_ids(out)) == report["totals"]["written"]
    rejects = [json.loads(line) for f in (out / "rejects").glob("*.jsonl")
               for line in f.read_text().splitlines()]
    assert len(rejects) == report["totals"]["rejected"]
    assert all(r["reason"] and r["lineage"] for r in rejects)
    # Images become InternVL tiles (448x448, thumbnail last), videos 448x448 frames.
    samples = {json.loads(s["json"])["id"]: s for tar in (out / "ingest").glob("demo_*.tar")
               for s in wds.WebDataset(str(tar), shardshuffle=False)}
    wide = samples["cap_01"]  # 1920x1080 -> (4, 2) grid + thumbnail
    rec = json.loads(wide["json"])
    assert rec["meta"]["tiling"]["images"][0]["grid"] == [4, 2]
    assert rec["meta"]["members"]["image"] == [f"tile_{i:02d}.jpg" for i in range(9)]
    assert rec["meta"]["tokens"]["image"] == 9 * 256
    for i in range(9):
        assert Image.open(io.BytesIO(wide[f"tile_{i:02d}.jpg"])).size == (448, 448)
    clip = json.loads(samples["vid_2"]["json"])
    assert clip["meta"]["video"]["frames"] == 16 and len(clip["meta"]["video"]["times"]) == 16
    assert Image.open(io.BytesIO(samples["vid_2"]["frame_15.jpg"])).size == (448, 448)
    ov = json.loads(samples["ov_0"]["json"])  # 640x480 JPEG bytes in a parquet row
    assert ov["image"] == "parquet:onevision-00000-of-00001.parquet#rg0/row0/image/-"
    assert ov["meta"]["tiling"]["images"][0]["grid"] == [4, 3]
    assert json.loads(samples["000000001"]["json"])["image"].startswith("tar:00000.tar#off")
    assert json.loads(samples["chat_0"]["json"])["meta"]["system"] == "Answer in one sentence."
    zh = json.loads(samples["BAC009S0002W0123"]["json"])
    assert zh["conversations"][1]["value"] == "我们 去 公园 散步"
    assert sf.info(io.BytesIO(samples["BAC009S0002W0123"]["audio_00.flac"])).samplerate == 16000
    speech = json.loads(samples["19-198-0000"]["json"])
    assert speech["meta"]["audio_info"][0]["sample_rate"] == 16000
    assert sf.info(io.BytesIO(samples["19-198-0000"]["audio_00.flac"])).samplerate == 16000


def test_manifests_describe_their_shards(tmp_path, caption_corpus):
    out = tmp_path / "out"
    build(load_config(caption_corpus), str(out))
    ms = list_manifests(str(out), "ingest")
    # 23 inputs, every 7th (6, 13, 20) missing its image: 20 samples. Ranges of max_samples (5)
    # inputs, one part each here: a part never spans two ranges, so a reject leaves it short.
    assert [(m.part, m.sub) for m in ms] == [(0, 0), (1, 0), (2, 0), (3, 0), (4, 0)]
    assert [m.shard for m in ms] == [f"cap-{k:05d}-00.tar" for k in range(5)]
    assert [m.count for m in ms] == [5, 4, 4, 5, 2]
    assert [m.rejected for m in ms] == [0, 1, 1, 0, 1]
    assert [(m.input_start, m.input_end) for m in ms] == [(0, 5), (5, 10), (10, 15), (15, 20),
                                                          (20, 23)]
    assert sum(m.inputs for m in ms) == 23 and ms[-1].input_end == 23
    for m in ms:
        if m.shard:
            tar = out / "ingest" / m.shard
            assert tar.stat().st_size == m.bytes
            assert [s["__key__"] for s in wds.WebDataset(str(tar), shardshuffle=False)] == [
                s.key for s in m.samples]
        assert m.count + m.rejected == m.inputs
        assert m.code_version and m.config_fingerprint


def test_byte_limit_splits_shards(tmp_path):
    cfg_path = make_caption_corpus(tmp_path / "in", 12, max_samples=1000)
    cfg = yaml.safe_load(cfg_path.read_text())
    build(load_config(cfg_path), str(tmp_path / "one"))
    sizes = [s.bytes for m in list_manifests(str(tmp_path / "one"), "ingest") for s in m.samples]
    limit = int(3.5 * max(sizes))
    cfg["shard"]["max_bytes"] = limit
    cfg_path.write_text(yaml.safe_dump(cfg))
    build(load_config(cfg_path), str(tmp_path / "out"))
    ms = list_manifests(str(tmp_path / "out"), "ingest")
    assert len(ms) >= 3 and sum(m.count for m in ms) == 12
    # A shard closes before it would pass the target (plus the tar's end-of-archive padding).
    assert all(m.bytes <= limit + 10240 for m in ms)
    assert len(shard_ids(tmp_path / "out")) == 12


def test_duplicate_ids_are_rejected(tmp_path):
    cfg_path = make_caption_corpus(tmp_path / "in", 4)
    recs = json.loads((tmp_path / "in" / "cap.json").read_text())
    recs.append(dict(recs[1]))
    (tmp_path / "in" / "cap.json").write_text(json.dumps(recs))
    report = build(load_config(cfg_path), str(tmp_path / "out"))
    assert report["sources"]["cap"]["reject_reasons"] == {"duplicate_id": 1}
    assert report["sources"]["cap"]["written"] == 4


def test_accounting_failure_is_loud(tmp_path, caption_corpus, monkeypatch):
    monkeypatch.setattr(PartWriter, "add_reject", lambda self, rec: None)  # a lost input
    with pytest.raises(AccountingError, match="inputs but"):
        build(load_config(caption_corpus), str(tmp_path / "out"))


def test_rerun_reuses_parts_and_picks_up_appended_inputs(tmp_path, caption_corpus):
    out = tmp_path / "out"
    first = build(load_config(caption_corpus), str(out))
    before = {p.name: p.stat().st_mtime_ns for p in (out / "ingest").glob("*.tar")}
    again = build(load_config(caption_corpus), str(out))
    assert again["sources"]["cap"]["parts_reused"] == first["sources"]["cap"]["parts"]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "ingest").glob("*.tar")} == before
    recs = json.loads((caption_corpus.parent / "cap.json").read_text())
    recs += [caption(100 + i, f"img/{j}.jpg") for i, j in enumerate([0, 1, 2, 3, 4, 5, 7])]
    (caption_corpus.parent / "cap.json").write_text(json.dumps(recs, indent=1))
    grown = build(load_config(caption_corpus), str(out))
    assert grown["sources"]["cap"]["inputs"] == 30
    assert grown["sources"]["cap"]["parts_reused"] == 4
    ids = shard_ids(out)
    assert len(ids) == len(set(ids)) == 27


def test_changed_input_rebuilds_from_the_changed_part(tmp_path, caption_corpus):
    out = tmp_path / "out"
    build(load_config(caption_corpus), str(out))
    recs = json.loads((caption_corpus.parent / "cap.json").read_text())
    recs[12]["conversations"][1]["value"] = "An edited caption."
    (caption_corpus.parent / "cap.json").write_text(json.dumps(recs, indent=1))
    report = build(load_config(caption_corpus), str(out))
    assert report["sources"]["cap"]["parts_reused"] == 2  # ranges 0-1 hold inputs 0..9
    assert "An edited caption." in [
        json.loads(s["json"])["conversations"][1]["value"]
        for s in wds.WebDataset(str(out / "ingest" / "cap-00002-00.tar"), shardshuffle=False)]


def test_changed_config_needs_overwrite(tmp_path, caption_corpus):
    out = tmp_path / "out"
    build(load_config(caption_corpus), str(out))
    cfg = yaml.safe_load(caption_corpus.read_text())
    cfg["shard"]["max_samples"] = 3
    caption_corpus.write_text(yaml.safe_dump(cfg))
    with pytest.raises(BuildError, match="--overwrite"):
        build(load_config(caption_corpus), str(out))
    build(load_config(caption_corpus), str(out), overwrite=True)
    # Ranges of 3 inputs now; input 6 is missing its image.
    assert [m.count for m in list_manifests(str(out), "ingest")][:3] == [3, 3, 2]
    assert len(shard_ids(out)) == 20


CRASH = textwrap.dedent("""
    import os, sys
    from storage import parts
    orig, calls = parts.PartWriter.add_sample, [0]
    def add_sample(self, *a, **k):
        calls[0] += 1
        if calls[0] == int(sys.argv[3]):
            os._exit(137)  # no cleanup, no finally: like a killed worker
        return orig(self, *a, **k)
    parts.PartWriter.add_sample = add_sample
    from flows.build.pipeline import build
    from schemas.config import load_config
    build(load_config(sys.argv[1]), sys.argv[2])
""")


@pytest.mark.parametrize("crash_at", [8, 13])
def test_crash_mid_shard_then_resume_gives_the_uninterrupted_result(tmp_path, caption_corpus,
                                                                    crash_at):
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    build(load_config(caption_corpus), str(clean))
    proc = subprocess.run([sys.executable, "-c", CRASH, str(caption_corpus), str(crashed),
                           str(crash_at)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 137, proc.stderr
    # No complete-looking shard: every tar under its final name has its manifest.
    names = {p.name for p in (crashed / "ingest").iterdir()}
    assert any(".tmp-" in n for n in names)  # the half shard, under a temporary name
    for tar in (crashed / "ingest").glob("*.tar"):
        assert (crashed / "ingest" / (tar.name[:-4] + ".manifest.json")).exists(), tar.name
    committed = list_manifests(str(crashed), "ingest")
    assert 0 < len(committed) < 5
    report = build(load_config(caption_corpus), str(crashed))
    assert report["sources"]["cap"]["parts_reused"] == len(committed)
    assert not any(".tmp-" in p.name for p in (crashed / "ingest").iterdir())
    ids = shard_ids(crashed)
    assert len(ids) == len(set(ids)) and ids == shard_ids(clean)
    assert tree_bytes(crashed) == tree_bytes(clean)
    assert sorted(p.name for p in (crashed / "rejects").iterdir()) == sorted(
        p.name for p in (clean / "rejects").iterdir())


def test_cli_refuses_bad_config_naming_the_field(tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"sources": [
        {"name": "a", "kind": "podcast", "format": "llava", "path": "x.json"}]}))
    result = CliRunner().invoke(app, ["build", "--config", str(tmp_path / "c.yaml"),
                                      "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "sources[0].kind" in result.output


def test_cli_build_prints_summary(tmp_path, caption_corpus):
    result = CliRunner().invoke(app, ["build", "-c", str(caption_corpus), "-o",
                                      str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert "missing_media" in result.output and "inputs == written + rejected" in result.output


def test_build_into_a_non_local_uri(tmp_path, caption_corpus):
    # fsspec's in-memory filesystem stands in for s3://: every write goes through the URI layer.
    import fsspec

    out = "memory://vc-test/out"
    report = build(load_config(caption_corpus), out)
    fs = fsspec.filesystem("memory")
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("/vc-test/out/ingest", detail=False))
    assert [n for n in names if n.endswith(".tar")] == [f"cap-{k:05d}-00.tar" for k in range(5)]
    assert not [n for n in names if ".tmp-" in n]
    assert report["sources"]["cap"]["written"] == 20
    again = build(load_config(caption_corpus), out)
    assert again["sources"]["cap"]["parts_reused"] == 5
    fs.rm("/vc-test", recursive=True)
