"""Duplicates by content: media hashes and the tiled-image cache, exact duplicates across
sources, near-duplicate text (MinHash LSH), benchmark leaks, near-duplicate images (pHash)."""

import json
import shutil
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from flows.build.pipeline import build
from schemas.config import load_config
from schemas.dedupe import BenchmarkConfig
from schemas.record import Record
from storage.benchmarks import read_benchmark
from storage.media_cache import MediaCache, entry_key
from transforms.dedupe import (
    BenchmarkIndex,
    band_keys,
    content_key,
    jaccard_estimate,
    lsh_params,
    minhash,
    normalise,
    tokens,
)

from conftest import tar_keys, write_image

LONG_A = ("The red bus drives slowly past the old stone bridge while a group of children "
          "waves from the river bank under a bright afternoon sky")
LONG_B = ("A small brown dog sleeps on a wooden porch next to a basket of green apples and a "
          "pair of muddy boots left by the farmer this morning")
LEAK_Q = ("Which planet in the solar system has the largest number of confirmed moons "
          "according to the most recent survey")


def _rec(rid: str, q: str, a: str, image: str | None = None) -> dict:
    human = ("<image>\n" if image else "") + q
    rec = {"id": rid, "conversations": [{"from": "human", "value": human},
                                        {"from": "gpt", "value": a}]}
    if image:
        rec["image"] = image
    return rec


def make_dup_corpus(root: Path, near: str = "reject", bench_fmt: str = "jsonl",
                    max_samples: int = 3) -> Path:
    """Two sources over shared images, with planted duplicates of every kind:
    - alpha: a0 (img0), a1 (img1), a2 text LONG_A, a3 (img0 again, other text), a4 (img2);
    - beta:  b0 = a0 with another path to the same bytes and other whitespace/case (exact),
             b1 = LONG_A with a word changed (near), b2 = a benchmark question (leak),
             b3 (img2 re-encoded at another size: a near-duplicate image), b4 unique,
             b5 = b4 again inside beta (exact, same source), b6 = a5's text on another image
             (kept: near-duplicate text must share the media)."""
    media = root / "media"
    write_image(media / "img0.jpg", (64, 48), seed=0)
    write_image(media / "img1.jpg", (48, 64), seed=1)
    (media / "copy").mkdir(parents=True, exist_ok=True)
    (media / "copy" / "same0.jpg").write_bytes((media / "img0.jpg").read_bytes())
    # A smooth picture (pHash needs structure, not noise), and the same at another size/quality.
    im = Image.linear_gradient("L").resize((96, 96)).convert("RGB")
    im.save(media / "img2.jpg", quality=95)
    im.resize((80, 80)).save(media / "img2_small.jpg", quality=60)
    alpha = [_rec("a0", "Describe the image.", "A noisy picture of many colours.", "img0.jpg"),
             _rec("a1", "Describe the image.", "Another noisy picture.", "img1.jpg"),
             _rec("a2", "What happens here?", LONG_A),
             _rec("a3", "What colours appear?", "Every colour at random.", "img0.jpg"),
             _rec("a4", "Describe the gradient.", "Dark on the left, light on the right.",
                  "img2.jpg"),
             _rec("a5", "Describe the image.", LONG_B, "img1.jpg")]
    beta = [_rec("b0", "describe   the IMAGE.", "A noisy picture of many colours.",
                 "copy/same0.jpg"),
            _rec("b1", "What happens here?", LONG_A.replace("slowly", "quickly")),
            _rec("b2", "Answer the question.", LEAK_Q + "? Saturn."),
            _rec("b3", "Describe this.", "A grey gradient picture.", "img2_small.jpg"),
            _rec("b4", "Tell a story.", LONG_B),
            _rec("b5", "Tell a story.", LONG_B),
            _rec("b6", "Describe the image.", LONG_B, "img0.jpg")]
    (root / "alpha.json").write_text(json.dumps(alpha))
    (root / "beta.jsonl").write_text("".join(json.dumps(r) + "\n" for r in beta))
    bench = write_benchmark(root, bench_fmt)
    cfg = {"name": "dups", "shard": {"max_samples": max_samples},
           "dedupe": {"exact": True,
                      "near_text": {"enabled": True, "threshold": 0.6, "action": near},
                      "near_image": {"enabled": True, "max_distance": 8},
                      "benchmarks": [{"name": "planets", "path": bench.name}]},
           "sources": [{"name": "alpha", "kind": "caption", "format": "llava",
                        "path": "alpha.json", "media_root": "media"},
                       {"name": "beta", "kind": "qa", "format": "llava",
                        "path": "beta.jsonl", "media_root": "media"}]}
    path = root / "corpus.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


BENCH_ITEMS = [{"id": "q1", "question": LEAK_Q, "answer": "Saturn"},
               {"id": "q2", "question": "What is the boiling point of water at sea level in "
                                        "degrees Celsius on a normal day", "answer": "100"},
               {"id": "q3", "question": "Too short a question", "answer": "yes"}]


def write_benchmark(root: Path, fmt: str) -> Path:
    path = root / f"planets.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(BENCH_ITEMS))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in BENCH_ITEMS))
    elif fmt == "csv":
        lines = ["id,question,answer"] + [f'{r["id"]},"{r["question"]}",{r["answer"]}'
                                           for r in BENCH_ITEMS]
        path.write_text("\n".join(lines) + "\n")
    else:
        pq.write_table(pa.Table.from_pylist(BENCH_ITEMS), path)
    return path


def rejects(out: Path) -> dict[str, dict]:
    got = {}
    for f in sorted((out / "rejects").glob("*.rejects.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            got[r["id"]] = r
    return got


def test_each_reason_with_its_detail(tmp_path):
    cfg = load_config(make_dup_corpus(tmp_path))
    report = build(cfg, str(tmp_path / "out"))
    out = tmp_path / "out"
    assert report["accounted"] is True
    rej = rejects(out)
    assert rej["b0"]["reason"] == "duplicate_content"
    assert "'a0' of source 'alpha'" in rej["b0"]["detail"]
    assert rej["b5"]["reason"] == "duplicate_content"
    assert "'b4' of source 'beta'" in rej["b5"]["detail"]
    assert rej["b1"]["reason"] == "near_duplicate"
    assert "'a2' of source 'alpha'" in rej["b1"]["detail"]
    assert rej["b2"]["reason"] == "eval_contamination"
    assert "item 'q1' of benchmark 'planets'" in rej["b2"]["detail"]
    assert set(rej) == {"b0", "b1", "b2", "b5"}
    beta = report["sources"]["beta"]
    assert beta["inputs"] == beta["written"] + beta["rejected"] == 7
    d = report["dedupe"]
    assert d["matrix"]["duplicate_content"] == {"alpha": {"beta": 1}, "beta": {"beta": 1}}
    assert d["matrix"]["near_duplicate"] == {"alpha": {"beta": 1}}
    assert d["benchmarks"] == {"planets": {"beta": 1}}
    assert d["benchmark_items"]["planets"] == {"indexed": 2, "too_short": 1}
    assert d["settings"]["near_text"]["bands"] * d["settings"]["near_text"]["rows"] <= 128
    # img0 is tiled once: a3 and (were it kept) b0 use the same bytes; img2_small is near img2.
    assert d["media_cache"]["misses"] == 4 and d["media_cache"]["hits"] == 3
    assert d["near_image"]["pairs"] == 1
    pair = json.loads((out / "report" / "near_images.jsonl").read_text())
    assert (pair["kept"]["id"], pair["other"]["id"]) == ("a4", "b3") and pair["distance"] <= 8
    assert d["near_image"]["matrix"] == {"alpha": {"beta": 1}}
    assert {c["kept"]["id"] for c in d["clusters"]} == {"a0", "a2", "b4"}
    # Each medium's content hash in the sample's meta and its manifest entry.
    man = json.loads((out / "ingest" / "alpha-00000-00.manifest.json").read_text())
    a0 = next(s for s in man["samples"] if s["id"] == "a0")
    import hashlib
    assert a0["media_sha256"] == [hashlib.sha256((tmp_path / "media/img0.jpg").read_bytes())
                                  .hexdigest()]
    assert len(a0["phash"]) == 1 and len(a0["phash"][0]) == 16
    page = (out / "report" / "index.html").read_text()
    assert "<h2>Duplicates</h2>" in page and "planets" in page and "alpha/a2" in page


def test_near_duplicates_reported_not_rejected(tmp_path):
    report = build(load_config(make_dup_corpus(tmp_path, near="report")), str(tmp_path / "out"))
    rej = rejects(tmp_path / "out")
    assert "b1" not in rej and "b1" in [k.split("-", 1)[1] for k in tar_keys(tmp_path / "out")]
    assert report["dedupe"]["by_kind"]["near_duplicate"] == {"report": 1}


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "parquet"])
def test_benchmark_file_formats(tmp_path, fmt):
    path = write_benchmark(tmp_path, fmt)
    items = list(read_benchmark(BenchmarkConfig(name="planets", path=str(path))))
    assert [i for i, _ in items] == ["q1", "q2", "q3"]
    assert items[0][1] == LEAK_Q + "\nSaturn"


def test_benchmark_leak_found_from_each_format(tmp_path):
    for fmt in ("json", "csv", "parquet"):
        root = tmp_path / fmt
        report = build(load_config(make_dup_corpus(root, bench_fmt=fmt)), str(root / "out"))
        assert report["dedupe"]["benchmarks"] == {"planets": {"beta": 1}}, fmt


def _decisions(out: Path) -> dict[str, tuple[str, str]]:
    return {k: (r["reason"], r["detail"]) for k, r in rejects(out).items()}


def test_kept_sample_same_with_one_and_two_workers_and_on_rebuild(tmp_path, ray_executor):
    cfg_path = make_dup_corpus(tmp_path, max_samples=2)
    local = tmp_path / "local"
    build(load_config(cfg_path), str(local))
    on_ray = tmp_path / "ray"
    build(load_config(cfg_path), str(on_ray), executor=ray_executor)
    assert _decisions(local) == _decisions(on_ray)
    assert tar_keys(local) == tar_keys(on_ray)
    before = {p.name: p.read_bytes() for p in (local / "ingest").glob("*.tar")}
    report = build(load_config(cfg_path), str(local))  # a rebuild decides the same
    assert _decisions(local) == _decisions(on_ray)
    assert {p.name: p.read_bytes() for p in (local / "ingest").glob("*.tar")} == before
    # Every part reused, and the cache hit for every image that was tiled.
    assert all(s["parts"] == s["parts_reused"] for s in report["sources"].values())


def test_rebuild_after_an_earlier_source_gains_the_same_sample(tmp_path):
    """An earlier source grows a copy of a sample a later source kept: the rerun rejects the
    later one, as a fresh build would."""
    cfg_path = make_dup_corpus(tmp_path, max_samples=2)
    out = tmp_path / "out"
    build(load_config(cfg_path), str(out))
    alpha = json.loads((tmp_path / "alpha.json").read_text())
    alpha.append(_rec("a9", "Tell a story.", LONG_B))  # beta's b4
    (tmp_path / "alpha.json").write_text(json.dumps(alpha))
    build(load_config(cfg_path), str(out))
    fresh = tmp_path / "fresh"
    build(load_config(cfg_path), str(fresh))
    assert _decisions(out) == _decisions(fresh)
    assert _decisions(out)["b4"][0] == "duplicate_content"
    assert tar_keys(out) == tar_keys(fresh)


def test_cache_entry_written_by_two_writers_at_once_reads_back_whole(tmp_path):
    blobs = [bytes([i]) * (300_000 + i) for i in range(6)]
    meta = {"grid": [2, 2], "tiles": 6}
    key = entry_key("ab" * 32, "image", {"image_size": 448})
    barrier = threading.Barrier(4)
    errors = []

    def writer() -> None:
        try:
            barrier.wait()
            for _ in range(20):
                MediaCache(str(tmp_path)).put(key, blobs, meta)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    done = threading.Event()

    def reader(got: list, misses: list) -> None:
        barrier.wait()
        while True:  # every read while the writers rename over each other, then one after
            last = done.is_set()
            entry = MediaCache(str(tmp_path)).get(key)
            (got if entry is not None else misses).append(entry)
            if last:
                return

    got: list = []
    misses: list = []
    writers = [threading.Thread(target=writer) for _ in range(3)]
    read = threading.Thread(target=reader, args=(got, misses))
    for t in [*writers, read]:
        t.start()
    for t in writers:
        t.join()
    done.set()
    read.join()
    assert not errors
    assert got and all(g == (blobs, meta) for g in got)
    assert MediaCache(str(tmp_path)).get(key) == (blobs, meta)
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file() and not p.name.endswith(".bin")]
    assert leftovers == []


def test_two_processes_fill_the_cache_at_once(tmp_path):
    """Two builds of the same images into OUTs sharing one cache folder, at once: every
    entry reads back whole and both builds' tiles are the same bytes."""
    import multiprocessing as mp

    cfg_path = make_dup_corpus(tmp_path)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["dedupe"]["cache"] = str(tmp_path / "shared_cache")
    cfg_path.write_text(yaml.safe_dump(cfg))
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_build_into, args=(str(cfg_path), str(tmp_path / f"o{i}")))
             for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert tar_keys(tmp_path / "o0") == tar_keys(tmp_path / "o1")
    a = {p.name: p.read_bytes() for p in (tmp_path / "o0" / "ingest").glob("*.tar")}
    b = {p.name: p.read_bytes() for p in (tmp_path / "o1" / "ingest").glob("*.tar")}
    assert a == b
    cache = MediaCache(str(tmp_path / "shared_cache"))
    entries = list((tmp_path / "shared_cache").rglob("*.bin"))
    assert len(entries) == 4
    for e in entries:
        assert cache.get(e.stem) is not None


def _build_into(cfg_path: str, out: str) -> None:
    build(load_config(cfg_path), out)


_word = st.text(alphabet="abcdefgh", min_size=1, max_size=6)


@settings(max_examples=60, deadline=None)
@given(words=st.lists(_word, min_size=1, max_size=20), spaces=st.integers(1, 3),
       upper=st.booleans())
def test_content_key_ignores_case_and_spacing_only(words, spaces, upper):
    text = " ".join(words)
    other = (" " * spaces).join(w.upper() if upper else w for w in words)
    rec = Record.model_validate({"id": "x", "set": "s", "conversations": [
        {"from": "human", "value": text}, {"from": "gpt", "value": "ok"}],
        "meta": {"task": "text", "source": "s", "lineage": "l", "language": "en"}})
    rec2 = rec.model_copy(deep=True)
    rec2.conversations[0].value = other
    assert normalise(text) == normalise(other)
    assert content_key(rec, {}) == content_key(rec2, {})
    assert content_key(rec, {}) != content_key(rec, {"image": ["0" * 64]})
    rec2.conversations[1].value = "ok then"
    assert content_key(rec, {}) != content_key(rec2, {})
    assert tokens(text) == [w.lower() for w in words]


def test_minhash_is_seeded_and_estimates_jaccard():
    a = tokens(LONG_A + " " + LONG_B)
    b = tokens(LONG_A + " " + LONG_B.replace("dog", "cat"))
    assert minhash(a, 3, 128, 7) == minhash(list(a), 3, 128, 7)
    assert minhash(a, 3, 128, 7) != minhash(a, 3, 128, 8)
    sa = {" ".join(a[i:i + 3]) for i in range(len(a) - 2)}
    sb = {" ".join(b[i:i + 3]) for i in range(len(b) - 2)}
    true = len(sa & sb) / len(sa | sb)
    assert abs(jaccard_estimate(minhash(a, 3, 256, 7), minhash(b, 3, 256, 7)) - true) < 0.12
    bands, rows = lsh_params(0.7, 128)
    assert bands * rows <= 128
    # At the threshold a pair becomes a candidate about half the time; far below, rarely.
    p = 1 - (1 - 0.7 ** rows) ** bands
    assert 0.3 < p < 0.9 and 1 - (1 - 0.3 ** rows) ** bands < 0.01
    assert len(band_keys(minhash(a, 3, 128, 7), bands, rows)) == bands


def test_benchmark_index_matches_13_token_windows_only():
    idx = BenchmarkIndex(13)
    idx.add("b", "i1", LEAK_Q)
    idx.add("b", "short", "yes or no")
    assert idx.too_short == {"b": 1} and idx.items == {"b": 1}
    words = tokens("Please tell me: " + LEAK_Q.upper() + " now.")
    assert idx.match(words) == ("b", "i1")
    twelve = tokens(LEAK_Q)[:12]
    assert idx.match(twelve) is None
    assert idx.match(tokens("yes or no")) is None


def test_stage_manifests_keep_the_media_hashes(tmp_path):
    from schemas.recipes import load_recipes, select_stages

    cfg = load_config(make_dup_corpus(tmp_path))
    build(cfg, str(tmp_path / "out"), stages=select_stages(load_recipes(), "1.2"))
    entries = [s for m in (tmp_path / "out" / "stage_1.2").glob("*.manifest.json")
               for s in json.loads(m.read_text())["samples"]]
    assert entries and all(len(s["media_sha256"]) == len(s["tiles"]) == len(s["phash"])
                           for s in entries)


def test_scale_corpus_plants_each_kind(tmp_path):
    from flows.corpora.scale import make_scale_inputs

    plain = load_config(make_scale_inputs(tmp_path / "plain", 1000))
    assert not plain.dedupe.decides and not (tmp_path / "plain" / "planted.jsonl").exists()
    cfg = load_config(make_scale_inputs(tmp_path / "p", 1000, plant=True))
    assert cfg.dedupe.exact and cfg.dedupe.near_text.enabled and cfg.dedupe.benchmarks
    planted = [json.loads(x) for x in (tmp_path / "p" / "planted.jsonl").read_text().splitlines()]
    kinds = {p["kind"] for p in planted}
    assert kinds == {"exact", "reworded", "leak", "variant"}
    # The unplanted records are those of the plain corpus.
    assert (tmp_path / "p" / "ocr.jsonl").read_bytes() == (tmp_path / "plain" / "ocr.jsonl").read_bytes()
    copies = {p["id"] for p in planted if p["kind"] == "exact"}
    vqa = json.loads((tmp_path / "p" / "qa_vita.json").read_text())
    assert copies <= {r["id"] for r in vqa}


def test_rerun_with_the_content_index_lost_decides_the_same(tmp_path):
    """The index gone (a crash before its first commit, or removed by hand): the rerun replays
    the kept inputs' decisions into a new one and keeps every part."""
    cfg_path = make_dup_corpus(tmp_path, max_samples=2)
    out = tmp_path / "out"
    first = build(load_config(cfg_path), str(out))["dedupe"]
    for f in (out / "state" / "ingest").glob("content.sqlite*"):
        f.unlink()
    again = build(load_config(cfg_path), str(out))
    assert all(s["parts"] == s["parts_reused"] for s in again["sources"].values())
    for k in ("by_kind", "matrix", "benchmarks", "clusters"):
        assert again["dedupe"][k] == first[k], k


def _shared_media_corpus(root: Path, cache: bool) -> Path:
    """Three video records over two clips (one shared) and three ASR records over two FLAC
    clips (one shared), plus a video too long for the limits: it is rejected, and left out of
    the cache."""
    from conftest import clip, write_flac

    media = root / "media"
    media.mkdir(parents=True, exist_ok=True)
    clip(media / "a.mp4", 2)
    clip(media / "b.mp4", 3, size="160x120")
    clip(media / "long.mp4", 4, size="160x120")
    write_flac(media / "x.flac", 1.0, sr=22050, seed=1)
    write_flac(media / "y.flac", 0.5, sr=16000, seed=2)
    vids = [{"id": f"v{i}", "video": name, "conversations": [
        {"from": "human", "value": "<video>\nWhat is shown?"},
        {"from": "gpt", "value": f"A test pattern, take {i}."}]}
        for i, name in enumerate(["a.mp4", "b.mp4", "a.mp4", "long.mp4"])]
    (root / "videos.json").write_text(json.dumps(vids))
    asr = [{"id": f"u{i}", "audio": name, "text": f"utterance {i}"}
           for i, name in enumerate(["x.flac", "y.flac", "x.flac"])]
    (root / "asr.jsonl").write_text("".join(json.dumps(r) + "\n" for r in asr))
    cfg = {"name": "shared", "shard": {"max_samples": 2},
           "limits": {"video_max_s": 3.5},
           "dedupe": {"media_cache": cache},
           "sources": [{"name": "vids", "kind": "video", "format": "llava",
                        "path": "videos.json", "media_root": "media"},
                       {"name": "speech", "kind": "asr", "format": "asr_jsonl",
                        "path": "asr.jsonl", "media_root": "media"}]}
    path = root / "corpus.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _members(out: Path) -> dict[tuple[str, str], bytes]:
    import tarfile

    got = {}
    for t in sorted((out / "ingest").glob("*.tar")):
        with tarfile.open(t) as tf:
            for m in tf.getmembers():
                key, _, member = m.name.partition(".")
                got[(key, member)] = tf.extractfile(m).read()
    assert got, "no members read"
    return got


def test_video_frames_and_audio_come_from_the_cache(tmp_path):
    """A clip that two records share is decoded once; the samples' frames and FLAC are the
    bytes a build without the cache writes; a rejected video leaves no entry; a second build
    into the same OUT decodes nothing."""
    on_cfg = load_config(_shared_media_corpus(tmp_path / "on", cache=True))
    off_cfg = load_config(_shared_media_corpus(tmp_path / "off", cache=False))
    on = build(on_cfg, str(tmp_path / "on" / "out"))
    off = build(off_cfg, str(tmp_path / "off" / "out"))
    for report in (on, off):
        assert report["accounted"] is True
        assert report["sources"]["vids"]["rejected"] == 1
        assert report["sources"]["speech"]["rejected"] == 0
    # Misses: a.mp4, b.mp4, long.mp4 (rejected, so not stored), x.flac, y.flac; hits: the
    # second use of a.mp4 and of x.flac.
    assert on["dedupe"]["media_cache"]["hits"] == 2
    assert on["dedupe"]["media_cache"]["misses"] == 5
    entries = list((tmp_path / "on" / "out" / "cache" / "media").rglob("*.bin"))
    assert len(entries) == 4
    got_on, got_off = _members(tmp_path / "on" / "out"), _members(tmp_path / "off" / "out")
    assert got_on == got_off
    frames = sorted(m for k, m in got_on if k.endswith("v0") and m.startswith("frame_"))
    assert frames and all(got_on[(k, m)] == got_on[(k.replace("v0", "v2"), m)]
                          for k, m in got_on if k.endswith("v0") and m.startswith("frame_"))
    keys = {k for k, _ in got_on}
    u0 = next(k for k in keys if k.endswith("u0"))
    u2 = next(k for k in keys if k.endswith("u2"))
    assert got_on[(u0, "audio_00.flac")] == got_on[(u2, "audio_00.flac")]
    assert got_on[(u0, "json")] != got_on[(u2, "json")]  # other ids and texts, same audio meta
    meta0, meta2 = json.loads(got_on[(u0, "json")]), json.loads(got_on[(u2, "json")])
    assert meta0["meta"]["audio_info"] == meta2["meta"]["audio_info"]
    # A build into the same OUT with its parts gone reads every usable clip from the cache.
    shutil.rmtree(tmp_path / "on" / "out" / "ingest")
    shutil.rmtree(tmp_path / "on" / "out" / "state")
    again = build(on_cfg, str(tmp_path / "on" / "out"))
    assert again["dedupe"]["media_cache"]["hits"] == 6
    assert again["dedupe"]["media_cache"]["misses"] == 1  # the rejected video, decoded again
    assert _members(tmp_path / "on" / "out") == got_on
