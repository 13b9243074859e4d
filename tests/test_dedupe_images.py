"""Near-duplicate images rejected in the planner (dedupe.near_image.action: reject): the later
sample of a pair is rejected `near_duplicate_image` naming the kept one, the same whatever the
number of workers and on a rebuild; the same bytes used again are no near-duplicate."""

import json
from pathlib import Path

import yaml
from test_dedupe import make_dup_corpus, rejects

from flows.build.pipeline import build
from schemas.config import load_config

from conftest import tar_keys


def _rejecting(root: Path, **kw) -> Path:
    path = make_dup_corpus(root, **kw)
    cfg = yaml.safe_load(path.read_text())
    cfg["dedupe"]["near_image"]["action"] = "reject"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _decisions(out: Path) -> dict[str, tuple[str, str]]:
    return {k: (r["reason"], r["detail"]) for k, r in rejects(out).items()}


def test_the_later_sample_of_a_near_image_pair_is_rejected_naming_the_kept(tmp_path):
    report = build(load_config(_rejecting(tmp_path)), str(tmp_path / "out"))
    rej = rejects(tmp_path / "out")
    assert rej["b3"]["reason"] == "near_duplicate_image"
    detail = rej["b3"]["detail"]
    assert "image 0 (img2_small.jpg)" in detail and "'a4' of source 'alpha' (input 4)" in detail
    # a3 and b6 use img0's bytes again (a0 has them): no near-duplicate of themselves
    assert set(rej) == {"b0", "b1", "b2", "b3", "b5"}
    assert report["accounted"] is True
    beta = report["sources"]["beta"]
    assert beta["inputs"] == beta["written"] + beta["rejected"] == 7
    d = report["dedupe"]
    assert d["by_kind"]["near_duplicate_image"] == {"reject": 1}
    assert d["matrix"]["near_duplicate_image"] == {"alpha": {"beta": 1}}
    assert d["images_phashed"] == 4  # img0, img1, img2, img2_small: once each
    # What the planner rejected is not in the shards, so the report finds no pair left.
    assert d["near_image"]["pairs"] == 0 and d["near_image"]["action"] == "reject"
    assert "b3" not in [k.split("-", 1)[1] for k in tar_keys(tmp_path / "out")]


def test_report_by_default_keeps_both(tmp_path):
    report = build(load_config(make_dup_corpus(tmp_path)), str(tmp_path / "out"))
    assert "b3" not in rejects(tmp_path / "out")
    assert report["dedupe"]["near_image"]["pairs"] == 1
    assert "near_duplicate_image" not in report["dedupe"]["by_kind"]


def test_kept_sample_same_with_one_and_two_workers_and_on_rebuild(tmp_path, ray_executor):
    cfg_path = _rejecting(tmp_path, max_samples=2)
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    build(load_config(cfg_path), str(local))
    build(load_config(cfg_path), str(on_ray), executor=ray_executor)
    assert _decisions(local) == _decisions(on_ray)
    assert _decisions(local)["b3"][0] == "near_duplicate_image"
    assert tar_keys(local) == tar_keys(on_ray)
    before = {p.name: p.read_bytes() for p in (local / "ingest").glob("*.tar")}
    report = build(load_config(cfg_path), str(local))
    assert _decisions(local) == _decisions(on_ray)
    assert {p.name: p.read_bytes() for p in (local / "ingest").glob("*.tar")} == before
    assert all(s["parts"] == s["parts_reused"] for s in report["sources"].values())


def test_rebuild_after_an_earlier_source_gains_the_near_image(tmp_path):
    """alpha first lacks a4 (img2), so beta's b3 (img2 re-encoded) is kept; alpha then gains
    a4: the rerun rejects b3 naming a4, as a fresh build does."""
    cfg_path = _rejecting(tmp_path, max_samples=2)
    alpha = json.loads((tmp_path / "alpha.json").read_text())
    a4 = next(r for r in alpha if r["id"] == "a4")
    (tmp_path / "alpha.json").write_text(json.dumps([r for r in alpha if r["id"] != "a4"]))
    out = tmp_path / "out"
    build(load_config(cfg_path), str(out))
    assert "b3" not in rejects(out)
    (tmp_path / "alpha.json").write_text(json.dumps([r for r in alpha if r["id"] != "a4"] + [a4]))
    build(load_config(cfg_path), str(out))
    fresh = tmp_path / "fresh"
    build(load_config(cfg_path), str(fresh))
    assert _decisions(out) == _decisions(fresh)
    assert _decisions(out)["b3"][0] == "near_duplicate_image"
    assert "'a4' of source 'alpha'" in _decisions(out)["b3"][1]
    assert tar_keys(out) == tar_keys(fresh)


def test_report_shows_near_duplicate_pairs_side_by_side(tmp_path):
    """Text and image pairs, kept beside rejected: the rejected one from the reject store (its
    image from the media root), the kept one from its shard."""
    build(load_config(_rejecting(tmp_path)), str(tmp_path / "out"))
    page = (tmp_path / "out" / "report" / "index.html").read_text()
    pairs = page.split("<div class='dpair'")[1:]
    kinds = [p.split("'", 2)[1] for p in pairs]
    assert kinds == ["near_duplicate", "near_duplicate_image"]
    text, image = pairs
    assert "alpha/a2 kept, beta/b1 rejected (Jaccard 0.79)" in text
    assert text.index("drives slowly past") < text.index("drives quickly past")
    assert "alpha/a4 kept, beta/b3 rejected (pHash 2 bits apart)" in image
    assert "A grey gradient picture." in image and "Dark on the left" in image
    srcs = [s.split('"', 1)[0] for s in image.split('src="')[1:]]
    assert len(srcs) == 2 and all((tmp_path / "out" / "report" / s).is_file() for s in srcs)


def test_report_shows_reported_image_pairs_from_the_shards(tmp_path):
    build(load_config(make_dup_corpus(tmp_path)), str(tmp_path / "out"))
    page = (tmp_path / "out" / "report" / "index.html").read_text()
    image = [p for p in page.split("<div class='dpair'")[1:] if p.startswith(" data-kind='near_image'")]
    assert len(image) == 1 and "alpha/a4 kept, beta/b3 reported" in image[0]
    assert image[0].count("<img") >= 2
