"""The validation gate on real built shards, corrupted in each way it must catch."""

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from flows.build.pipeline import build
from flows.corpora.demo import make_demo_inputs
from flows.validation.gate import validate, validate_stage
from schemas.config import load_config
from schemas.recipes import DEFAULT_RECIPES
from storage.shards import TarShardWriter, iter_samples, sha256_of
from storage.verdict import ValidationRequired, require_verdict

from conftest import screenshot


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    root = tmp_path_factory.mktemp("val")
    cfg = load_config(make_demo_inputs(root / "inputs"))
    build(cfg, str(root / "out"), stages=DEFAULT_RECIPES)
    return root / "out"


@pytest.fixture
def out(demo_out, tmp_path):
    dst = tmp_path / "out"
    shutil.copytree(demo_out, dst)
    return dst


def rewrite(out: Path, stage: str, shard: str, change, manifest_members: bool = True) -> None:
    """Rewrite a shard through `change(samples)` and fix its manifest's sha256, size and count,
    so that only the content checks can notice. With `manifest_members` the manifest's sample
    list follows too (a shard written that way, as opposed to one damaged afterwards)."""
    tar = out / stage / shard
    samples = [(k, dict(m)) for k, m in iter_samples(str(tar))]
    samples = change(samples)
    w = TarShardWriter(str(tar))
    for key, members in samples:
        w.write_sample(key, list(members.items()))
    size, sha = w.close()
    mpath = out / stage / shard.replace(".tar", ".manifest.json")
    m = json.loads(mpath.read_text())
    m.update(bytes=size, sha256=sha, count=len(samples))
    if manifest_members:
        entries = {e["key"]: e for e in m["samples"]}
        first = m["samples"][0]
        m["samples"] = [{**entries.get(k, {**first, "id": json.loads(mem["json"])["id"]}),
                         "key": k, "members": list(mem)} for k, mem in samples]
        m["input_end"] = m["input_start"] + len(samples) + m["rejected"]
    mpath.write_text(json.dumps(m))


def shard_of(out: Path, stage: str, member_prefix: str) -> str:
    for tar in sorted((out / stage).glob("*.tar")):
        for _, members in iter_samples(str(tar)):
            if any(k.startswith(member_prefix) for k in members):
                return tar.name
    raise AssertionError(f"no {member_prefix} member in {stage}")


def failed(verdict) -> set[str]:
    return {f"{f['expectation']}:{f['column']}" for f in verdict["failed"]}


def test_a_clean_build_passes_and_training_may_use_it(out):
    verdicts = validate(str(out))
    assert set(verdicts) == {f"stage_{r.stage}" for r in DEFAULT_RECIPES}
    assert all(v["passed"] and not v["quarantined"] for v in verdicts.values()), verdicts
    assert require_verdict(str(out), "2.2")["passed"]
    assert Path(verdicts["stage_1.2"]["data_docs"]).exists()


def test_flipped_byte_fails_sha256_quarantines_and_training_refuses(out):
    shard = sorted((out / "stage_1.2").glob("*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    v = validate_stage(str(out), "stage_1.2")
    assert not v["passed"] and "expect_column_values_to_be_in_set:sha256_ok" in failed(v)
    assert [q["shard"] for q in v["quarantined"]] == [shard.name]
    assert not shard.exists()
    q = out / "validation" / "quarantine" / "stage_1.2"
    assert (q / shard.name).exists() and (q / shard.name.replace(".tar", ".manifest.json")).exists()
    assert "sha256_ok" in (q / shard.name.replace(".tar", ".failed.json")).read_text()
    with pytest.raises(ValidationRequired, match="failed validation"):
        require_verdict(str(out), "1.2")
    from training.config import RunConfig
    from training.loop import TrainingRefused, train

    with pytest.raises(TrainingRefused, match="failed validation"):  # the trainer itself refuses
        train(out / "stage_1.2", out / "run", RunConfig(stage="1.2", steps=1), from_scratch=True)
    assert not (out / "run").exists()


def rejects_of(out: Path, stage: str, shard: str) -> list[dict]:
    path = out / "rejects" / stage / shard.replace(".tar", ".rejects.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def keys(tar: Path) -> list[str]:
    return [k for k, _ in iter_samples(str(tar))] if tar.exists() else []


def test_a_sample_written_without_a_member_is_taken_out_not_its_shard(out):
    shard = shard_of(out, "stage_1.2", "tile_")
    before = keys(out / "stage_1.2" / shard)
    assert len(before) >= 2

    def drop_tile(samples):
        key, members = samples[0]
        del members[sorted(k for k in members if k.startswith("tile_"))[-1]]
        return samples

    rewrite(out, "stage_1.2", shard, drop_tile)
    v = validate_stage(str(out), "stage_1.2")
    assert "expect_column_values_to_be_in_set:members_ok" in failed(v)
    assert v["passed"] and v["quarantined"] == []  # the good samples still train
    assert [f["grain"] for f in v["failed"]] == ["sample"]
    assert v["removed_samples"]["count"] == 1
    assert v["removed_samples"]["by_reason"] == {"member_mismatch": 1}
    assert keys(out / "stage_1.2" / shard) == before[1:]
    # Nothing is lost: the original shard is kept, the sample is a reject line with its id.
    q = out / "validation" / "quarantine" / "stage_1.2"
    assert keys(q / shard) == before
    (line,) = rejects_of(out, "stage_1.2", shard)
    assert line["reason"] == "member_mismatch" and line["id"] and "members_ok" in line["detail"]
    m = json.loads((out / "stage_1.2" / shard.replace(".tar", ".manifest.json")).read_text())
    assert m["count"] == len(before) - 1 and m["rejected"] == 1
    assert m["count"] + m["rejected"] == m["input_end"] - m["input_start"]
    assert require_verdict(str(out), "1.2")["passed"]
    # Validating again finds nothing more to do.
    again = validate_stage(str(out), "stage_1.2")
    assert again["passed"] and again["failed"] == [] and again["removed_samples"]["count"] == 0


def test_a_member_lost_from_the_tar_quarantines_the_shard(out):
    shard = shard_of(out, "stage_1.2", "tile_")

    def drop_tile(samples):
        key, members = samples[0]
        del members[sorted(k for k in members if k.startswith("tile_"))[-1]]
        return samples

    # The manifest still lists the member: the tar was damaged after it was written.
    rewrite(out, "stage_1.2", shard, drop_tile, manifest_members=False)
    v = validate_stage(str(out), "stage_1.2")
    assert not v["passed"]
    assert "expect_column_values_to_be_in_set:members_match_manifest" in failed(v)
    assert [q["shard"] for q in v["quarantined"]] == [shard]
    assert not (out / "stage_1.2" / shard).exists()


def test_duplicate_id_across_shards_removes_only_the_later_copy(out):
    tars = sorted((out / "stage_1.3").glob("*.tar"))
    assert len(tars) >= 2
    first = next(iter(iter_samples(str(tars[0]))))
    n0, n1 = len(keys(tars[0])), len(keys(tars[1]))
    rewrite(out, "stage_1.3", tars[1].name,
            lambda s: [*s, (first[0] + "_copy", dict(first[1]))])
    v = validate_stage(str(out), "stage_1.3")
    assert "expect_column_values_to_be_in_set:id_first" in failed(v)
    assert v["passed"] and v["quarantined"] == []
    assert len(keys(tars[0])) == n0 and len(keys(tars[1])) == n1  # the copy is gone
    (line,) = rejects_of(out, "stage_1.3", tars[1].name)
    assert line["reason"] == "duplicate_id" and tars[0].name in line["detail"]


def test_validation_in_chunks_finds_a_duplicate_across_chunks_and_a_damaged_shard(out):
    tars = sorted((out / "stage_1.3").glob("*.tar"))
    first = next(iter(iter_samples(str(tars[0]))))
    rewrite(out, "stage_1.3", tars[-1].name,
            lambda s: [*s, (first[0] + "_copy", dict(first[1]))])
    data = bytearray(tars[1].read_bytes())
    data[700] ^= 0xFF
    tars[1].write_bytes(bytes(data))
    v = validate_stage(str(out), "stage_1.3", chunk_rows=3)
    assert v["chunks"] >= 3
    assert v["removed_samples"]["by_reason"] == {"duplicate_id": 1}
    assert [q["shard"] for q in v["quarantined"]] == [tars[1].name]
    assert not v["passed"]  # the damaged shard fails the stage until it is rebuilt
    kept = sum(len(keys(t)) for t in tars if t.exists())
    assert v["samples"] == kept


def test_a_conversation_ending_on_a_human_turn_is_removed_with_its_reason(out):
    shard = sorted((out / "stage_1.2").glob("*.tar"))[0]

    def end_on_human(samples):
        rec = json.loads(samples[-1][1]["json"])
        rec["conversations"].append({"from": "human", "value": "and then?"})
        samples[-1][1]["json"] = json.dumps(rec).encode()
        return samples

    n = len(keys(shard))
    rewrite(out, "stage_1.2", shard.name, end_on_human)
    v = validate_stage(str(out), "stage_1.2")
    assert v["passed"] and v["removed_samples"]["by_reason"] == {"bad_turn_order": 1}
    assert len(keys(shard)) == n - 1


def test_video_with_too_few_frames_for_its_duration(out):
    shard = shard_of(out, "stage_1.3", "frame_")

    def claim_20s(samples):
        for _, m in samples:
            if any(k.startswith("frame_") for k in m):
                rec = json.loads(m["json"])
                rec["meta"]["video"]["duration_s"] = 20.0  # 4 or 8 frames cannot be a 20 s clip
                m["json"] = json.dumps(rec).encode()
        return samples

    rewrite(out, "stage_1.3", shard, claim_20s)
    v = validate_stage(str(out), "stage_1.3")
    assert "expect_column_values_to_be_in_set:frames_rule_ok" in failed(v)
    assert set(v["removed_samples"]["by_reason"]) == {"bad_frame_count"}
    # Only a clip that has 16 frames can be 20 s long; every other video sample is out.
    left = [sum(k.startswith("frame_") for k in m)
            for _, m in iter_samples(str(out / "stage_1.3" / shard))]
    assert all(n in (0, 16) for n in left)


def test_44k_audio_is_taken_out_and_training_uses_the_rest(out):
    shard = shard_of(out, "stage_2.1a", "audio_")
    n = len(keys(out / "stage_2.1a" / shard))

    def resample_44k(samples):
        key, m = samples[0]
        buf = io.BytesIO()
        t = np.arange(44100) / 44100
        sf.write(buf, 0.3 * np.sin(2 * np.pi * 300 * t), 44100, format="FLAC")
        m["audio_00.flac"] = buf.getvalue()
        return samples

    rewrite(out, "stage_2.1a", shard, resample_44k)
    v = validate_stage(str(out), "stage_2.1a")
    assert "expect_column_values_to_be_in_set:audio_rate_ok" in failed(v)
    assert v["removed_samples"]["by_reason"] == {"bad_sample_rate": 1}
    assert len(keys(out / "stage_2.1a" / shard)) == n - 1
    assert require_verdict(str(out), "2.1a")["samples"] == v["samples"]


def test_a_recipe_fraction_far_off_fails_the_mix(tmp_path):
    from test_stages_report import mixed_corpus

    cfg = load_config(mixed_corpus(tmp_path / "in", n_caption=20, n_qa=200))
    out = tmp_path / "out"
    build(cfg, str(out), stages=[r for r in DEFAULT_RECIPES if r.stage == "1.3"])
    assert validate_stage(str(out), "stage_1.3")["passed"]
    report = json.loads((out / "report" / "build_report.json").read_text())
    report["stages"]["1.3"]["pools"]["qa"]["requested"] = 0.5  # the shards hold 100% of qa
    (out / "report" / "build_report.json").write_text(json.dumps(report))
    v = validate_stage(str(out), "stage_1.3")
    assert not v["passed"] and "expect_column_values_to_be_between:deviation_sigmas" in failed(v)
    assert v["quarantined"] == []  # the mix is the stage's fault, not a shard's


def test_changed_shard_after_validation_is_refused(out):
    validate(str(out), "1.1")
    tar = sorted((out / "stage_1.1").glob("*.tar"))[0]
    rewrite(out, "stage_1.1", tar.name, lambda s: s[:-1])
    with pytest.raises(ValidationRequired, match="changed since"):
        require_verdict(str(out), "1.1")
    with pytest.raises(ValidationRequired, match="has not been validated"):
        require_verdict(str(out), "3.2")


def test_an_empty_stage_passes_but_training_refuses_it(tmp_path):
    from test_stages_report import mixed_corpus

    cfg = load_config(mixed_corpus(tmp_path / "in", n_caption=4, n_qa=10))
    build(cfg, str(tmp_path / "out"), stages=[r for r in DEFAULT_RECIPES if r.stage == "3.1"])
    v = validate_stage(str(tmp_path / "out"), "stage_3.1")
    assert v["passed"] and v["samples"] == 0
    with pytest.raises(ValidationRequired, match="no samples"):
        require_verdict(str(tmp_path / "out"), "3.1")


def test_data_docs_open_in_headless_chromium(out, tmp_path):
    v = validate_stage(str(out), "stage_2.2")
    png = screenshot(Path(v["data_docs"]), tmp_path / "docs.png", (1280, 900))
    arr = np.asarray(Image.open(png).convert("L")).astype(float)
    assert arr.std() > 10  # a rendered page, not a blank one
    assert "stage_2.2" in Path(v["data_docs"]).read_text()
    assert sha256_of(str(png))[0] > 10_000
