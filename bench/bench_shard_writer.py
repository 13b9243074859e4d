"""Shard writer throughput with media pass-through, against a plain `tarfile` loop.

Both sides write the same samples (a ~1 kB JSON and a JPEG read from disk per sample) into
~64 MB shards. Ours also hashes every byte (sha256 for the manifest), writes the part manifest
and renames each shard into place; the baseline does none of that. A third row runs the whole
ingest of the same corpus (parse, image checks, shards, manifests) for context.

    .venv/bin/python bench/bench_shard_writer.py [--samples 3000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flows.build.pipeline import build  # noqa: E402
from schemas.config import load_config  # noqa: E402
from storage.parts import PartWriter  # noqa: E402

SHARD_SAMPLES = 500


def make_inputs(root: Path, n: int) -> tuple[list[tuple[str, bytes, str]], Path]:
    """n samples over 50 distinct 1280x720 JPEGs; returns (key, json, image path) and a config."""
    rng = np.random.default_rng(0)
    img_dir = root / "media"
    img_dir.mkdir(parents=True)
    for i in range(50):
        base = rng.integers(0, 255, (45, 80, 3), dtype=np.uint8)
        im = Image.fromarray(base).resize((1280, 720), Image.BICUBIC)
        im.save(img_dir / f"{i}.jpg", quality=90)
    samples, recs = [], []
    for i in range(n):
        rec = {"id": f"s{i:07d}", "image": f"{i % 50}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image in detail."},
            {"from": "gpt", "value": "A blurred mosaic of coloured blocks. " * 20}]}
        recs.append(rec)
        samples.append((f"bench-s{i:07d}", json.dumps(rec).encode(), str(img_dir / rec["image"])))
    (root / "recs.json").write_text(json.dumps(recs))
    cfg = root / "corpus.yaml"
    cfg.write_text(yaml.safe_dump({"name": "bench", "shard": {"max_samples": SHARD_SAMPLES},
                                   "sources": [{"name": "bench", "kind": "caption", "format": "llava",
                                                "path": "recs.json", "media_root": "media"}]}))
    return samples, cfg


def run_ours(samples, out: Path) -> int:
    part, writer = 0, PartWriter(str(out), "ingest", "bench", 0, 0, "bench")
    for i, (key, js, img) in enumerate(samples):
        data = Path(img).read_bytes()
        writer.add_input(i, key)
        writer.add_sample(key, key, i, [("json", js), ("image_00.jpg", data)])
        if len(writer.samples) >= SHARD_SAMPLES:
            writer.commit()
            part += 1
            writer = PartWriter(str(out), "ingest", "bench", part, i + 1, "bench")
    if writer.samples:
        writer.commit()
    return sum(p.stat().st_size for p in (out / "ingest").glob("*.tar"))


def run_tarfile(samples, out: Path) -> int:
    out.mkdir(parents=True)
    tar, part = None, 0
    for i, (key, js, img) in enumerate(samples):
        if tar is None:
            tar = tarfile.open(out / f"bench-{part:05d}.tar", "w")
        data = Path(img).read_bytes()
        for suffix, payload in (("json", js), ("image_00.jpg", data)):
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size = len(payload)
            info.mtime = time.time()
            tar.addfile(info, io.BytesIO(payload))
        if (i + 1) % SHARD_SAMPLES == 0:
            tar.close()
            tar, part = None, part + 1
    if tar is not None:
        tar.close()
    return sum(p.stat().st_size for p in out.glob("*.tar"))


def run_build(cfg: Path, out: Path) -> int:
    build(load_config(cfg), str(out))
    return sum(p.stat().st_size for p in (out / "ingest").glob("*.tar"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="vc-bench-"))
    try:
        samples, cfg = make_inputs(root / "in", args.samples)
        cases = {
            "plain tarfile loop (baseline)": lambda o: run_tarfile(samples, o),
            "vita-corpus PartWriter (sha256 + manifest + atomic rename)": lambda o: run_ours(samples, o),
            "vita-corpus full ingest (parse + image check + shard)": lambda o: run_build(cfg, o),
        }
        rows = []
        for name, fn in cases.items():
            times, nbytes = [], 0
            for r in range(args.repeat + 1):  # the first run warms the page cache
                out = root / f"out-{abs(hash(name))}-{r}"
                t0 = time.perf_counter()
                nbytes = fn(out)
                dt = time.perf_counter() - t0
                shutil.rmtree(out)
                if r:
                    times.append(dt)
            t = statistics.median(times)
            rows.append((name, args.samples / t, nbytes / t / 2**20, t))
        print(f"\n{args.samples} samples, {nbytes / 2**20:.0f} MB of shards, median of "
              f"{args.repeat} runs, {os.cpu_count()} cores")
        print(f"| {'case':<60} | samples/s | MB/s | seconds |")
        print(f"|{'-' * 62}|----------:|-----:|--------:|")
        for name, sps, mbs, t in rows:
            print(f"| {name:<60} | {sps:9.0f} | {mbs:4.0f} | {t:7.2f} |")
        base = rows[0][1]
        print(f"\nPartWriter / tarfile loop: {rows[1][1] / base:.2f}x; "
              f"full ingest / tarfile loop: {rows[2][1] / base:.2f}x")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
