import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from flows.build.pipeline import build
from flows.build.stages import stage_coin
from flows.cli import app
from flows.report.mix import compare, make_report
from schemas.config import ConfigError, load_config
from schemas.recipes import DEFAULT_RECIPES, StageRecipe, load_recipes, select_stages, write_recipes
from storage.parts import list_manifests
from storage.shards import iter_samples

from conftest import screenshot, write_image


def test_default_recipes_are_the_papers_table():
    r = {x.stage: x for x in DEFAULT_RECIPES}
    assert r["1.1"].pools == {"caption": 0.2} and r["1.1"].trainable == ["vision_adapter"]
    assert r["1.2"].pools == {"caption": 1.0}
    assert r["1.3"].pools == {"qa": 1.0, "ocr": 1.0, "video": 1.0, "text": 1.0, "caption": 0.2}
    assert r["2.2"].pools["caption"] == 0.04 and r["2.2"].pools["qa"] == 0.2
    assert r["2.2"].speech_fraction == 0.5 and "state_head" in r["2.2"].trainable
    assert "llm" not in r["2.1b"].trainable and "llm" not in r["3.2"].trainable
    assert r["3.1"].trainable == ["codec"]


@pytest.mark.parametrize("recipe", DEFAULT_RECIPES, ids=lambda r: r.stage)
def test_achieved_fractions_match_requested_on_thousands_of_records(recipe):
    n = 4000
    for pool, frac in recipe.pools.items():
        chosen = sum(stage_coin(1234, recipe.stage, pool, f"{pool}_{i}") < frac for i in range(n))
        tol = 4 * math.sqrt(frac * (1 - frac) / n) + 1e-9
        assert abs(chosen / n - frac) <= tol, (recipe.stage, pool, chosen / n, frac)


def test_recipe_files_round_trip_and_refuse_bad_values(tmp_path):
    write_recipes(tmp_path)
    assert load_recipes(tmp_path) == {r.stage: r for r in DEFAULT_RECIPES}
    bad = yaml.safe_load((tmp_path / "stage_1.1.yaml").read_text())
    bad["pools"] = {"podcasts": 0.5}
    (tmp_path / "stage_1.1.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="unknown pool 'podcasts'"):
        load_recipes(tmp_path)
    with pytest.raises(ValueError, match="fraction"):
        StageRecipe(stage="9.9", name="x", pools={"qa": 1.5}, trainable=["llm"])
    with pytest.raises(ValueError, match="unknown modules"):
        StageRecipe(stage="9.9", name="x", pools={"qa": 0.5}, trainable=["gpu"])
    with pytest.raises(ConfigError, match="unknown stage"):
        select_stages({r.stage: r for r in DEFAULT_RECIPES}, "1.1,7.7")


def mixed_corpus(root: Path, n_caption: int = 60, n_qa: int = 200, seed: int = 5) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    caps = []
    for i in range(n_caption):
        write_image(root / "img" / f"{i}.jpg", (64, 48), seed=i)
        caps.append({"id": f"c{i}", "image": f"img/{i}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": f"Pic {i}."}]})
    qa = [{"id": f"q{i}", "conversations": [
        {"from": "human", "value": f"What is {i} plus {i}?"}, {"from": "gpt", "value": str(2 * i)}]}
        for i in range(n_qa)]
    (root / "cap.json").write_text(json.dumps(caps))
    (root / "qa.json").write_text(json.dumps(qa))
    cfg = {"name": "mix", "seed": seed, "shard": {"max_samples": 50}, "sources": [
        {"name": "cap", "kind": "caption", "format": "llava", "path": "cap.json"},
        {"name": "qa", "kind": "qa", "format": "llava", "path": "qa.json"}]}
    (root / "corpus.yaml").write_text(yaml.safe_dump(cfg))
    return root / "corpus.yaml"


def stage_ids(out: Path, stage: str) -> list[str]:
    return [s.id for m in list_manifests(str(out), f"stage_{stage}") for s in m.samples]


def stage_bytes(out: Path, stage: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / f"stage_{stage}").glob("*.tar"))}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    cfg = load_config(mixed_corpus(root / "in"))
    report = build(cfg, str(root / "out"), stages=DEFAULT_RECIPES)
    return root, cfg, report


def test_stage_shards_hold_the_selected_share(mixed):
    root, cfg, report = mixed
    for r in DEFAULT_RECIPES:
        if not set(r.pools) & {"caption", "qa"}:
            continue
        want = {f"c{i}" for i in range(60) if stage_coin(cfg.seed, r.stage, "caption", f"c{i}")
                < r.pools.get("caption", 0)}
        want |= {f"q{i}" for i in range(200) if stage_coin(cfg.seed, r.stage, "qa", f"q{i}")
                 < r.pools.get("qa", 0)}
        assert sorted(stage_ids(root / "out", r.stage)) == sorted(want), r.stage
    st = report["stages"]["1.3"]["pools"]
    assert st["qa"]["achieved"] == 1.0 and st["qa"]["selected"] == 200
    assert abs(st["caption"]["achieved"] - 0.2) < 0.15
    # 2.2 speaks about half of its questions; the other stages speak none.
    mix = make_report(str(root / "out"))
    sf = mix["stages"]["stage_2.2"]["speech_questions"]["spoken_fraction"]
    assert 0.25 <= sf <= 0.75
    assert mix["stages"]["stage_1.3"]["speech_questions"]["spoken"] == 0
    # A spoken question's audio is in the record's token estimate and the manifest's alike.
    entries = {s.key: s for m in list_manifests(str(root / "out"), "stage_2.2") for s in m.samples}
    spoken = 0
    for tar in sorted((root / "out" / "stage_2.2").glob("*.tar")):
        for key, members in iter_samples(str(tar)):
            meta = json.loads(members["json"])["meta"]
            durations = [q["duration_s"] for q in (meta.get("speech") or {}).get("questions", [])]
            if not durations:
                continue
            spoken += 1
            tok = meta["tokens"]
            assert tok["audio"] == sum(math.ceil(d * 12.5) for d in durations) > 0
            assert tok["total"] == sum(v for k, v in tok.items() if k != "total")
            assert entries[key].tokens == tok["total"]
    assert spoken > 0


def test_same_seed_same_selection_and_a_changed_recipe_changes_only_its_stage(mixed, tmp_path):
    root, cfg, _ = mixed
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    before = {r.stage: stage_bytes(out, r.stage) for r in DEFAULT_RECIPES}
    again = build(cfg, str(out), stages=DEFAULT_RECIPES)
    assert all(s["reused"] for s in again["stages"].values())
    recipes = {r.stage: r for r in DEFAULT_RECIPES}
    recipes["1.1"] = recipes["1.1"].model_copy(update={"pools": {"caption": 0.5}})
    changed = build(cfg, str(out), stages=list(recipes.values()))
    assert changed["stages"]["1.1"]["reused"] is False
    assert [s for s, v in changed["stages"].items() if not v["reused"]] == ["1.1"]
    for r in DEFAULT_RECIPES:
        if r.stage != "1.1":
            assert stage_bytes(out, r.stage) == before[r.stage], r.stage
    assert 18 <= len(stage_ids(out, "1.1")) <= 42  # now about half of the 60 captions
    other_seed = cfg.model_copy(update={"seed": cfg.seed + 1})
    build(other_seed, str(tmp_path / "seed2"), stages=[recipes["1.1"]])
    assert stage_ids(tmp_path / "seed2", "1.1") != stage_ids(out, "1.1")


def test_report_json_has_every_figure(mixed):
    root, _, _ = mixed
    rep = json.loads((root / "out" / "report" / "data_mix.json").read_text())
    ing = rep["stages"]["ingest"]
    assert ing["samples"] == 260 and ing["samples_by_source"] == {"cap": 60, "qa": 200}
    assert ing["tiles_per_image"] == {"13": 60}  # 64x48 is 4:3: a (4, 3) grid + thumbnail
    # 13 tiles of 256 tokens per image, plus each record's few text tokens.
    assert 60 * 13 * 256 < ing["tokens_by_modality"]["image"] < 60 * (13 * 256 + 20)
    assert set(rep["recipes"]) == {r.stage for r in DEFAULT_RECIPES}
    assert rep["recipes"]["1.1"]["pools"]["caption"]["requested"] == 0.2
    assert rep["stages"]["stage_2.2"]["audio_hours"] > 0


def test_html_report_renders_with_visible_charts(mixed, tmp_path):
    root, _, _ = mixed
    png = screenshot(root / "out" / "report" / "index.html", tmp_path / "report.png",
                     (1280, 1600))
    arr = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert arr.shape[:2] == (1600, 1280)
    # The bars are drawn: the chart palette's first colour (#3366cc) and the "achieved" green
    # (#109618) cover real areas of the page.
    blue = np.all(np.abs(arr - [0x33, 0x66, 0xcc]) < 8, axis=-1).sum()
    green = np.all(np.abs(arr - [0x10, 0x96, 0x18]) < 8, axis=-1).sum()
    assert blue > 2000 and green > 2000, (blue, green)


def test_compare_shows_what_moved(mixed, tmp_path):
    root, _, _ = mixed
    cfg_path = mixed_corpus(tmp_path / "in", n_caption=60, n_qa=230)
    build(load_config(cfg_path), str(tmp_path / "out"), stages=DEFAULT_RECIPES)
    rows = compare(make_report(str(root / "out")), make_report(str(tmp_path / "out")))
    moved = {(s, f): (a, b) for s, f, a, b in rows}
    assert moved[("ingest", "samples")] == (260, 290)
    assert moved[("ingest", "source:qa")] == (200, 230)
    assert ("stage_1.2", "samples") not in moved  # captions did not change
    result = CliRunner().invoke(app, ["report", str(tmp_path / "out"), "--compare",
                                      str(root / "out")])
    assert result.exit_code == 0, result.output
    assert "what moved" in result.output and "+30" in result.output
