"""Duplicates by content on the scale corpus with planted duplicates, against the same build
with the content checks off, in one run; and the tiled-image cache against no cache.

    PYTHONPATH=. .venv/bin/python bench/bench_dedupe.py [--sizes 10000,100000] [--num-cpus 2]
        [--root bench/out/dedupe] [--cache-n 600] [--keep] [--image-reject] [--no-speech]

For each N: `make_scale_inputs(plant=True)` writes the corpus with exact copies across sources,
reworded answers, images re-encoded at 3/4 size and quality 60, and benchmark questions, each
listed in planted.jsonl. Two builds of the ingest (`vita-corpus build --stages none
--no-validate`, a fresh process on a local Ray of --num-cpus CPUs, timed with /usr/bin/time):
`off` (dedupe.exact, near_text, near_image and benchmarks off; the media cache on, as by
default) and `on`
(the corpus's config: exact, near text at the defaults, a benchmark, pHash report, the media
cache). Then recall and precision of each kind against the plant, from the rejects and the
build report: exact = planted copies rejected `duplicate_content` naming their original;
near text = planted rewordings rejected `near_duplicate` naming their original (precision:
of every `near_duplicate` reject); leaks = planted questions rejected `eval_contamination`
naming their item; images = planted (variant, original) pairs among the pHash report's
pairs (OUT/report/near_images.jsonl), by content hash. Exact precision counts only planted
copies as true: the generator also repeats content on purpose (ASR clips with their
transcript, OCR signs with their text, text-speech lines), listed apart as unplanted. Near text
precision is also given counting the unplanted flags whose two texts are equal once digits are
masked (records the generator filled alike by chance; see flows/corpora/plant.py).
--no-speech turns the ingest's speech off in every build (the same in each): the checks' added
seconds are then set against a shorter build (a larger share: the stricter reading), and the
1M builds fit a day's session and the disk (speech is most of an ingest's time and bytes).
--image-reject adds a third build with near_image.action reject: planted photo pairs of which
the shards keep one photo only (recall), and `near_duplicate_image` rejects whose image is a
photo of a planted pair (precision).

The cache case: --cache-n caption records of 640x480 photos (13 tiles each), 30% of them
pointing at an image an earlier record already uses, built with the media cache on and off
(each into a fresh OUT); images (records) tiled per second of the whole build.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CLI = str(Path(sys.executable).parent / "vita-corpus")


def run_build(cfg: Path, out: Path, cpus: int) -> dict:
    if out.exists():
        shutil.rmtree(out)
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false")
    t0 = time.time()
    proc = subprocess.run(["/usr/bin/time", "-f", "TIME %e %M", CLI, "build", "-c", str(cfg),
                           "-o", str(out), "--stages", "none", "--no-validate", "--quiet",
                           "--num-cpus", str(cpus)], env=env, capture_output=True, text=True)
    wall = time.time() - t0
    line = [x for x in proc.stderr.splitlines() if x.startswith("TIME ")]
    if proc.returncode not in (0, 1) or not line:
        raise SystemExit(f"build failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                         f"{proc.stderr[-3000:]}")
    _, secs, rss_kb = line[-1].split()
    report = json.loads((out / "report" / "build_report.json").read_text())
    workers = max((w.get("worker_peak_rss_mb", 0) for w in
                   report["partitions"]["sources"].values()), default=0)
    return {"wall_s": round(wall, 1), "driver_peak_rss_mb": round(int(rss_kb) / 1024, 1),
            "worker_peak_rss_mb": round(workers, 1), "report": report}


def rejects(out: Path) -> dict[tuple[str, str, str], dict]:
    """Every reject by (source, id, reason). By reason too: an id can be rejected twice in one
    source (the scale corpus repeats a few ids on purpose: the second input is a
    `duplicate_id`), and a reject of one reason must not hide the other's."""
    got = {}
    for f in (out / "rejects").glob("*.rejects.jsonl"):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            got[(r["source"], r.get("id") or "", r["reason"])] = r
    return got


KEPT = re.compile(r"of '(.+?)' of source '(.+?)' \(input (\d+)\), kept$")


def same_but_numbers(cfg_path: Path, pairs: list[tuple[str, str, str, str]]) -> int:
    """How many of the (source, id, kept source, kept id) pairs have the same normalised text
    once every run of digits is masked: records the generator filled with the same template
    words by chance, differing only in their record numbers (near-duplicates it did not plant;
    the bench checks them on the text itself, not with the detector's measure)."""
    from schemas.config import load_config
    from storage.readers import read_source
    from transforms.dedupe import normalise

    cfg = load_config(cfg_path)
    want = {(s, i) for a, b, c, d in pairs for s, i in ((a, b), (c, d))}
    texts: dict[tuple[str, str], str] = {}
    for src in cfg.sources:
        if not any(s == src.name for s, _ in want):
            continue
        for item in read_source(src, limits=cfg.limits):
            rec = item.record
            if rec is not None and (src.name, rec.id) in want:
                texts.setdefault((src.name, rec.id), re.sub(r"\d+", "#", normalise(rec.text())))
    return sum(texts.get((a, b)) is not None and texts.get((a, b)) == texts.get((c, d))
               for a, b, c, d in pairs)


def evaluate(root: Path, out: Path, report: dict) -> dict:
    planted = [json.loads(x) for x in (root / "planted.jsonl").read_text().splitlines()]
    rej = rejects(out)
    res = {}
    for kind, reason in (("exact", "duplicate_content"), ("reworded", "near_duplicate"),
                         ("leak", "eval_contamination")):
        plants = [p for p in planted if p["kind"] == kind]
        found = 0
        for p in plants:
            r = rej.get((p["source"], p["id"], reason))
            if r and f"{p['of'][1]!r}" in r["detail"]:
                found += 1
        flagged = [r for r in rej.values() if r["reason"] == reason]
        planted_ids = {(p["source"], p["id"]) for p in plants}
        true_flags = sum((r["source"], r["id"]) in planted_ids for r in flagged)
        res[kind] = {"planted": len(plants), "found": found,
                     "recall": round(found / len(plants), 4) if plants else None,
                     "flagged": len(flagged),
                     "precision": round(true_flags / len(flagged), 4) if flagged else None}
        if kind == "reworded":  # unplanted flags: near-duplicates the generator made by chance?
            other = [(r["source"], r["id"], *KEPT.search(r["detail"]).group(2, 1))
                     for r in flagged if (r["source"], r["id"]) not in planted_ids]
            same = same_but_numbers(root / "corpus.yaml", other)
            res[kind]["unplanted_same_but_numbers"] = same
            res[kind]["precision_with_those"] = \
                round((true_flags + same) / len(flagged), 4) if flagged else None
    # Exact duplicates the generator makes without planting (ASR clips, OCR signs and
    # text-speech lines repeat with the same text): real duplicates, counted apart.
    ex = [r for r in rej.values() if r["reason"] == "duplicate_content"]
    planted_ex = {(p["source"], p["id"]) for p in planted if p["kind"] == "exact"}
    res["exact"]["unplanted_by_source"] = {}
    for r in ex:
        if (r["source"], r["id"]) not in planted_ex:
            d = res["exact"]["unplanted_by_source"]
            d[r["source"]] = d.get(r["source"], 0) + 1
    # Images: the report's pairs (OUT/report/near_images.jsonl) against the planted
    # (variant, original) pairs, by content hash.
    import hashlib

    media = root / "media"
    sha = {}
    for p in planted:
        if p["kind"] == "variant":
            for rel in (p["image"], p["of_image"]):
                sha.setdefault(rel, hashlib.sha256((media / rel).read_bytes()).hexdigest())
    want = {frozenset((sha[p["image"]], sha[p["of_image"]]))
            for p in planted if p["kind"] == "variant"}
    got = [json.loads(x) for x in (out / "report" / "near_images.jsonl").read_text().splitlines()]
    got_pairs = {frozenset((g["kept"]["sha256"], g["other"]["sha256"])) for g in got}
    hit = len(want & got_pairs)
    res["variant"] = {"planted_pairs": len(want), "found": hit,
                      "recall": round(hit / len(want), 4) if want else None,
                      "flagged": len(got_pairs),
                      "precision": round(hit / len(got_pairs), 4) if got_pairs else None,
                      "matrix": report["dedupe"].get("near_image", {}).get("matrix")}
    return res


def reject_config(cfg_path: Path) -> Path:
    """The corpus's config with near_image.action reject (the planner drops the later sample)."""
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["dedupe"]["near_image"] = {"enabled": True, "action": "reject"}
    path = cfg_path.with_name("corpus_image_reject.yaml")
    path.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    return path


def evaluate_image_reject(root: Path, out: Path) -> dict:
    """Planted (variant, original) photo pairs of which the shards keep one photo only, and the
    `near_duplicate_image` rejects whose image is a photo of a planted pair."""
    import hashlib

    planted = [json.loads(x) for x in (root / "planted.jsonl").read_text().splitlines()]
    pairs = {(p["image"], p["of_image"]) for p in planted if p["kind"] == "variant"}
    photos = {x for pair in pairs for x in pair}
    sha = {x: hashlib.sha256((root / "media" / x).read_bytes()).hexdigest() for x in photos}
    kept: set[str] = set()
    for m in (out / "ingest").glob("*.manifest.json"):
        for s in json.loads(m.read_text())["samples"]:
            kept.update(s.get("media_sha256") or [])
    both = sum(sha[a] in kept and sha[b] in kept for a, b in pairs)
    flagged = [r for r in rejects(out).values() if r["reason"] == "near_duplicate_image"]
    true = sum(json.loads(r["raw"]).get("image") in photos for r in flagged)
    return {"planted_pairs": len(pairs), "pairs_with_one_photo_kept": len(pairs) - both,
            "recall": round((len(pairs) - both) / len(pairs), 4) if pairs else None,
            "flagged": len(flagged),
            "precision": round(true / len(flagged), 4) if flagged else None}


def no_speech_config(cfg_path: Path) -> Path:
    """The corpus's config with the ingest's speech off (--no-speech)."""
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg.setdefault("transforms", {}).setdefault("speech", {})["enabled"] = False
    path = cfg_path.with_name("corpus_no_speech.yaml")
    path.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    return path


def off_config(cfg_path: Path) -> Path:
    cfg = yaml.safe_load(cfg_path.read_text())
    # The media cache stays on (the default): the cache case measures it apart.
    cfg["dedupe"] = {"exact": False, "media_cache": True, "near_text": {"enabled": False},
                     "near_image": {"enabled": False}, "benchmarks": []}
    path = cfg_path.with_name("corpus_off.yaml")
    path.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    return path


def cache_case(root: Path, n: int, cpus: int) -> dict:
    import random

    from flows.corpora.demo import make_image

    rng = random.Random(7)
    media = root / "media"
    recs, used = [], []
    for i in range(n):
        if used and rng.random() < 0.3:
            img = rng.choice(used)
        else:
            img = f"p_{i:05d}.jpg"
            make_image(media / img, (640, 480), seed=i)
            used.append(img)
        recs.append({"id": f"p{i:05d}", "image": img, "conversations": [
            {"from": "human", "value": "<image>\nDescribe the photo."},
            {"from": "gpt", "value": f"Photo {i}: shapes of several colours."}]})
    (root / "photos.json").write_text(json.dumps(recs))
    results = {}
    for cache in (False, True):
        cfg = {"name": "cache", "dedupe": {"media_cache": cache, "near_image": {"enabled": False}},
               "sources": [{"name": "photos", "kind": "caption", "format": "llava",
                            "path": "photos.json", "media_root": "media"}]}
        path = root / f"cache_{cache}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        r = run_build(path, root / f"out_{cache}", cpus)
        mc = r["report"]["dedupe"]["media_cache"]
        results["on" if cache else "off"] = {
            "wall_s": r["wall_s"], "images_per_s": round(n / r["wall_s"], 2),
            "build_duration_s": r["report"]["duration_s"],
            "images_per_build_s": round(n / r["report"]["duration_s"], 2),
            "hits": mc["hits"], "misses": mc["misses"], "hit_rate": mc["hit_rate"]}
    results["shared_records"] = sum(1 for r in recs) - len(used)
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--root", default=str(ROOT / "bench" / "out" / "dedupe"))
    ap.add_argument("--cache-n", type=int, default=600)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--image-reject", action="store_true",
                    help="a third build with near_image.action reject, and its quality")
    ap.add_argument("--no-speech", action="store_true",
                    help="the ingest's speech off in every build (see the docstring)")
    args = ap.parse_args()
    from flows.corpora.scale import make_scale_inputs

    root = Path(args.root)
    results: dict = {"sizes": {}}
    if args.cache_n:
        croot = root / "cache"
        results["cache"] = cache_case(croot, args.cache_n, args.num_cpus)
        print(json.dumps({"cache": results["cache"]}), flush=True)
        if not args.keep:
            shutil.rmtree(croot, ignore_errors=True)
    for n in [int(x) for x in args.sizes.split(",") if x]:
        nroot = root / f"n{n}"
        t0 = time.time()
        cfg = make_scale_inputs(nroot / "inputs", n, plant=True)
        if args.no_speech:
            cfg = no_speech_config(cfg)
        gen_s = round(time.time() - t0, 1)
        off = run_build(off_config(cfg), nroot / "out_off", args.num_cpus)
        on = run_build(cfg, nroot / "out_on", args.num_cpus)
        quality = evaluate(nroot / "inputs", nroot / "out_on", on["report"])
        rep = on["report"]
        entry = {
            "generate_s": gen_s, "inputs": rep["totals"]["inputs"], "speech": not args.no_speech,
            "off": {k: off[k] for k in ("wall_s", "driver_peak_rss_mb", "worker_peak_rss_mb")},
            "on": {k: on[k] for k in ("wall_s", "driver_peak_rss_mb", "worker_peak_rss_mb")},
            "added_s": round(on["wall_s"] - off["wall_s"], 1),
            "added_pct": round(100 * (on["wall_s"] - off["wall_s"]) / off["wall_s"], 1),
            "accounted": rep["accounted"], "quality": quality,
            "by_kind": rep["dedupe"].get("by_kind"),
            "media_cache": rep["dedupe"]["media_cache"],
            "media_files_hashed": rep["dedupe"].get("media_files_hashed"),
            "lsh": rep["dedupe"]["settings"]["near_text"],
        }
        if args.image_reject:
            rj = run_build(reject_config(cfg), nroot / "out_reject", args.num_cpus)
            entry["image_reject"] = {
                **{k: rj[k] for k in ("wall_s", "driver_peak_rss_mb", "worker_peak_rss_mb")},
                "accounted": rj["report"]["accounted"],
                "images_phashed": rj["report"]["dedupe"].get("images_phashed"),
                "pairs_left": rj["report"]["dedupe"]["near_image"]["pairs"],
                "quality": evaluate_image_reject(nroot / "inputs", nroot / "out_reject")}
        results["sizes"][n] = entry
        print(json.dumps({n: entry}), flush=True)
        if not args.keep:
            shutil.rmtree(nroot, ignore_errors=True)
    (root).mkdir(parents=True, exist_ok=True)
    (root / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
