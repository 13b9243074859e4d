"""Packing several samples into one row: the same per-sample loss as alone, less padding."""

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flows.build.pipeline import build
from flows.corpora.demo import make_demo_inputs
from flows.validation.gate import validate
from schemas.config import load_config
from schemas.recipes import DEFAULT_RECIPES
from training.config import RunConfig
from training.data import LoaderSettings, StageLoader, list_shards
from training.loop import TrainingRefused, build_start, train
from training.packing import first_fit_decreasing
from training.stages import plan_for
from training.template import ChatTemplate


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("packing")
    cfg = load_config(make_demo_inputs(root / "inputs"))
    build(cfg, str(root / "out"), stages=[r for r in DEFAULT_RECIPES if r.stage in ("1.3", "2.2")])
    assert all(v["passed"] for v in validate(str(root / "out")).values())
    return root / "out"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 50), max_size=40), st.integers(50, 120))
def test_first_fit_decreasing_places_every_sample_once_within_capacity(lengths, capacity):
    rows = first_fit_decreasing(lengths, capacity)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= capacity for r in rows)
    # no two rows could be merged: first fit leaves at most one row half empty or less
    assert sum(1 for r in rows if sum(lengths[i] for i in r) <= capacity // 2) <= 1
    assert rows == first_fit_decreasing(lengths, capacity)


@pytest.mark.parametrize("stage", ["1.3", "2.2"])
def test_a_packed_batch_gives_each_sample_its_loss_alone(stage, demo):
    """Stage 1.3 packs images, video frames and text-only samples; 2.2 a spoken (audio) and a
    typed question with the state head."""
    files = list_shards(demo / f"stage_{stage}")
    torch.manual_seed(0)
    model, tok, cfg, _ = build_start(demo / "unused", plan_for(stage), files, None, None)
    template = ChatTemplate(tok, cfg.tokens_per_tile)
    packed = StageLoader(files, template, LoaderSettings("lm", 2, 1200, 0, 64, pack=True))
    alone = StageLoader(files, template, LoaderSettings("lm", 1, 1200, 0, 64))
    rows = max(packed._batches(0, 0, 1), key=lambda b: max(len(r) for r in b))
    flat = [p for r in rows for p in r]
    assert max(len(r) for r in rows) >= 2, [[p.length for p in r] for r in rows]
    batch = packed.collate(rows)
    assert batch["input_ids"].shape[0] == len(rows) < len(flat)
    assert "position_ids" in batch
    with torch.no_grad():
        res = model.lm_loss(batch, state_weight=1.0, per_sample=True)
        one_by_one = torch.stack([model.lm_loss(alone.collate([p]), 1.0)["lm"] for p in flat])
        padded = alone.collate(flat)  # the same samples, one per row, padded
        together = model.lm_loss(padded, 1.0)
    assert batch["samples"] == [p.key for p in flat]
    assert torch.allclose(res["per_sample"], one_by_one, rtol=1e-5, atol=1e-5), \
        (res["per_sample"], one_by_one)
    assert res["lm"].item() == pytest.approx(together["lm"].item(), rel=1e-5)
    if stage == "2.2":
        assert batch["state_index"].shape[0] == padded["state_index"].shape[0] > 0
        assert res["state"].item() == pytest.approx(together["state"].item(), rel=1e-5)
    assert batch["padding"] < padded["padding"]


def test_training_with_packing_reports_less_padding(demo, tmp_path):
    shards = demo / "stage_1.3"
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    train(shards, plain, RunConfig(stage="1.3", steps=3, batch_size=4, max_len=1024), from_scratch=True)
    train(shards, packed, RunConfig(stage="1.3", steps=3, batch_size=2, max_len=1024, pack=True),
          from_scratch=True)
    a = [json.loads(line) for line in (plain / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (packed / "metrics.jsonl").read_text().splitlines()]
    assert all("padding" in r for r in a + b)
    mean = lambda rows: sum(r["padding"] for r in rows) / len(rows)  # noqa: E731
    assert mean(b) < mean(a), (mean(a), mean(b))
    assert sum(len(r["samples"]) for r in b) > sum(len(r["samples"]) for r in a)  # more per row
    with pytest.raises(TrainingRefused, match="pack: True -> False"):
        train(shards, packed, RunConfig(stage="1.3", steps=4, batch_size=2, max_len=1024), resume=True)
    with pytest.raises(TrainingRefused, match="drop --pack"):
        train(demo / "stage_1.3", tmp_path / "x", RunConfig(stage="3.1", steps=1, pack=True),
              skip_validation=True, from_scratch=True)
