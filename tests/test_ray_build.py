"""The build on a real local Ray (Ray Data), against the in-process executor."""

import json
from pathlib import Path

from flows.build.executors import LocalExecutor
from flows.build.pipeline import build
from schemas.config import load_config

from conftest import make_caption_corpus


def tars(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "ingest").glob("*.tar"))}


def test_ray_build_equals_local_build_byte_for_byte(tmp_path, ray_executor):
    # 150 inputs, every 9th with a missing image: 8 partitions of 20 inputs, each transformed
    # and written by a Ray task.
    cfg = load_config(make_caption_corpus(tmp_path / "in", 150, max_samples=20, bad_every=9))
    local = build(cfg, str(tmp_path / "local"), executor=LocalExecutor())
    on_ray = build(cfg, str(tmp_path / "ray"), executor=ray_executor)
    assert on_ray["sources"] == local["sources"]
    assert on_ray["sources"]["cap"]["rejected"] == 16
    assert tars(tmp_path / "ray") == tars(tmp_path / "local")
    rej = sorted((tmp_path / "ray" / "rejects").glob("*.jsonl"))
    assert [p.read_text() for p in rej] == [
        (tmp_path / "local" / "rejects" / p.name).read_text() for p in rej]


def test_ray_build_of_the_demo_corpus(tmp_path, ray_executor):
    from flows.corpora.demo import make_demo_inputs

    cfg = load_config(make_demo_inputs(tmp_path / "inputs"))
    report = build(cfg, str(tmp_path / "out"), executor=ray_executor)
    assert report["accounted"] and report["totals"]["inputs"] == 52
    assert report["totals"]["written"] == 40
    saved = json.loads((tmp_path / "out" / "report" / "build_report.json").read_text())
    assert saved["totals"] == report["totals"]


def test_speech_questions_on_a_ray_actor_pool_equal_local(tmp_path, ray_executor):
    from test_speech import qa_records, speech_corpus

    cfg = load_config(speech_corpus(tmp_path / "in", qa_records(120)))
    local = build(cfg, str(tmp_path / "local"), executor=LocalExecutor())
    on_ray = build(cfg, str(tmp_path / "ray"), executor=ray_executor)
    assert on_ray["sources"] == local["sources"]
    assert on_ray["sources"]["qa"]["speech_questions"]["spoken"] > 40
    assert tars(tmp_path / "ray") == tars(tmp_path / "local")


def test_validation_on_ray_matches_local(tmp_path, ray_executor):
    from flows.validation.gate import validate_stage
    from schemas.recipes import DEFAULT_RECIPES

    from test_stages_report import mixed_corpus

    cfg = load_config(mixed_corpus(tmp_path / "in", n_caption=10, n_qa=120))
    build(cfg, str(tmp_path / "out"), stages=[r for r in DEFAULT_RECIPES if r.stage == "1.3"],
          executor=ray_executor)
    on_ray = validate_stage(str(tmp_path / "out"), "stage_1.3", executor=ray_executor)
    local = validate_stage(str(tmp_path / "out"), "stage_1.3")
    assert on_ray["passed"] and local["passed"]
    # All 120 QA records and a fifth of the 10 captions.
    assert on_ray["shards"] == local["shards"] and on_ray["samples"] == local["samples"] >= 120
