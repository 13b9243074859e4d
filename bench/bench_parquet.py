"""A parquet source with embedded JPEGs (issue 27): peak memory and rows/s of its ingest, against
pyarrow alone reading the same row groups, in the same run.

    .venv/bin/python bench/bench_parquet.py [--mb 2048] [--build-mb 512] [--image 448x448]
                                            [--rows-per-group 100] [--files 4] [--keep DIR]

1. A source is generated: --files parquet shards (HF datasets' layout: `id`, `image` as a
   {bytes, path} struct, `conversations`; --rows-per-group rows a row group, HF's default for
   image datasets) of --mb MB in all. The JPEGs are a pool of 64 distinct noise images at
   --image, repeated, so generating 2 GB takes seconds; every row has its own id.
2. Each of these runs in a fresh child process, which reports its own peak RSS (ru_maxrss):
   - `pyarrow`: pyarrow alone, every row group of every file read with read_row_group
     (the columns the llava preset maps), nothing else: the floor of reading;
   - `reader`: the planner's read of the source (storage.readers.read_source: pyarrow by
     batches, every medium hashed for the raw input, a record per row), nothing transformed;
   - `refetch`: the worker's side alone: every record's image read again through its
     reference (storage.embedded), in order, as the workers of a build read them;
   - `build`: the whole ingest of the first --build-mb MB of files (in-process executor, so the
     one process is driver and worker): tiles, shards, manifests; its wall time, rows/s and
     peak RSS. Reading overhead = (reader + refetch) / build, per row, at the same file size.
Figures go to stdout as JSON lines and a markdown table; bench/RESULTS.md keeps them.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _peak_mb() -> float:
    """This process's peak resident memory (VmHWM: ru_maxrss would carry the parent's peak
    over the fork and exec that started it)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def generate(folder: Path, mb: int, files: int, rows_per_group: int, size: tuple[int, int]
             ) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    pool = []
    for _ in range(64):
        buf = io.BytesIO()
        base = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize(size, Image.BICUBIC)
        Image.fromarray(np.clip(np.asarray(img) + rng.normal(0, 12, (size[1], size[0], 3)), 0,
                                255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        pool.append(buf.getvalue())
    avg = sum(map(len, pool)) / len(pool)
    rows = int(mb * 2**20 / avg)
    per_file = -(-rows // files)
    img_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    turns = json.dumps([{"from": "human", "value": "<image>\nWhat is in the image?"},
                        {"from": "gpt", "value": "Smooth colour blobs with fine noise."}])
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for f in range(files):
        count = min(per_file, rows - n)
        schema = pa.schema([("id", pa.string()), ("image", img_type),
                            ("conversations", pa.string())])
        # No dictionary: the pool's repeats would be stored once per row group, and the file
        # would be smaller than the media it holds, unlike a real dataset's.
        with pq.ParquetWriter(folder / f"train-{f:05d}-of-{files:05d}.parquet", schema,
                              use_dictionary=False) as w:
            for s in range(0, count, rows_per_group):
                k = min(rows_per_group, count - s)
                ids = [f"row{n + s + i:08d}" for i in range(k)]
                imgs = [{"bytes": pool[(n + s + i) % len(pool)], "path": f"{ids[i]}.jpg"}
                        for i in range(k)]
                w.write_table(pa.table({"id": ids, "image": pa.array(imgs, img_type),
                                        "conversations": [turns] * k}, schema=schema),
                              row_group_size=rows_per_group)
        n += count
    total = sum(p.stat().st_size for p in folder.glob("*.parquet"))
    return {"rows": rows, "bytes": total, "image_bytes_avg": int(avg), "files": files}


def _cfg(folder: Path, files: list[str] | None = None):
    from schemas.config import config_from_dict

    path = str(folder) if files is None else str(folder / files[0])
    # The media cache off: the pool's 64 images would be tiled once each and every other row
    # served from the cache, so the build would time cache hits, not the tiling a source of
    # distinct images pays (what the reading overhead is measured against).
    return config_from_dict({"shard": {"max_samples": 1000, "max_bytes": 2**30},
                             "dedupe": {"media_cache": False},
                             "sources": [{"name": "pq", "kind": "qa", "format": "parquet",
                                          "path": path}]})


def child(what: str, folder: Path, out: Path | None) -> dict:
    t0 = time.perf_counter()
    rows = 0
    if what == "pyarrow":
        import pyarrow.parquet as pq

        for p in sorted(folder.glob("*.parquet")):
            pf = pq.ParquetFile(p)
            for rg in range(pf.metadata.num_row_groups):
                t = pf.read_row_group(rg, columns=["id", "image", "conversations"])
                rows += t.num_rows
                del t
    elif what == "reader":
        from storage.readers import read_source

        for item in read_source(_cfg(folder).sources[0]):
            assert item.record is not None, item.error
            rows += 1
    elif what == "refetch":
        from storage.embedded import EmbeddedMedia
        from storage.readers import read_source

        src = _cfg(folder).sources[0]
        refs = [item.record.image for item in read_source(src)]  # refs only: a few MB
        t0 = time.perf_counter()
        reader = EmbeddedMedia(str(folder))
        for ref in refs:
            rows += bool(reader.read(ref, "image"))
    elif what == "build":
        from flows.build.pipeline import build

        assert out is not None
        report = build(_cfg(folder), str(out))
        src = report["sources"]["pq"]
        assert src["accounted"] and src["rejected"] == 0, src
        rows = src["written"]
    else:
        raise SystemExit(f"unknown child {what}")
    wall = time.perf_counter() - t0
    return {"what": what, "rows": rows, "wall_s": round(wall, 2),
            "rows_per_s": round(rows / wall, 1), "peak_rss_mb": round(_peak_mb(), 1)}


def run_child(what: str, folder: Path, out: Path | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", what, "--folder", str(folder)]
    if out is not None:
        cmd += ["--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    if res.returncode:
        raise SystemExit(f"{what} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=2048)
    ap.add_argument("--build-mb", type=int, default=512)
    ap.add_argument("--image", default="448x448")
    ap.add_argument("--rows-per-group", type=int, default=100)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--keep", default=None)
    ap.add_argument("--child", default=None)
    ap.add_argument("--folder", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, Path(a.folder), Path(a.out) if a.out else None)))
        return
    w, h = map(int, a.image.split("x"))
    tmp = Path(a.keep or tempfile.mkdtemp(prefix="bench_parquet_"))
    results = []
    try:
        big, small = tmp / "big", tmp / "small"
        info = generate(big, a.mb, a.files, a.rows_per_group, (w, h))
        print(json.dumps({"source": info}), flush=True)
        sinfo = generate(small, a.build_mb, max(1, a.files * a.build_mb // a.mb),
                         a.rows_per_group, (w, h))
        print(json.dumps({"build_source": sinfo}), flush=True)
        for folder, label in ((big, f"{info['bytes'] / 2**20:.0f} MiB"),
                              (small, f"{sinfo['bytes'] / 2**20:.0f} MiB")):
            for what in ("pyarrow", "reader", "refetch"):
                r = {**run_child(what, folder), "source": label}
                results.append(r)
                print(json.dumps(r), flush=True)
        r = {**run_child("build", small, tmp / "out"), "source": results[-1]["source"]}
        results.append(r)
        print(json.dumps(r), flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print("\n| run | source | rows | wall s | rows/s | peak RSS MB |\n|---|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['what']} | {r['source']} | {r['rows']:,} | {r['wall_s']} | "
              f"{r['rows_per_s']:,} | {r['peak_rss_mb']:,} |")
    by = {(r["what"], r["source"]): r for r in results}
    label = results[-1]["source"]
    b = by[("build", label)]
    per_row = {k: by[(k, label)]["wall_s"] / by[(k, label)]["rows"]
               for k in ("pyarrow", "reader", "refetch")}
    build_row = b["wall_s"] / b["rows"]
    print(f"\nper row at {label}: build {build_row * 1e3:.2f} ms; reader "
          f"{per_row['reader'] * 1e3:.2f} ms, refetch {per_row['refetch'] * 1e3:.2f} ms, "
          f"pyarrow alone {per_row['pyarrow'] * 1e3:.2f} ms; reading overhead (reader + "
          f"refetch) / build = {(per_row['reader'] + per_row['refetch']) / build_row:.1%}, "
          f"beyond pyarrow's own reading "
          f"{(per_row['reader'] + per_row['refetch'] - per_row['pyarrow']) / build_row:.1%}")


if __name__ == "__main__":
    main()
