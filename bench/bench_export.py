"""Export speed: a stage of N samples exported --format vita in one process (the baseline) and
as shard tasks on 1 and 2 Ray workers, in the same run.

    .venv/bin/python bench/bench_export.py [--n 20000] [--per-shard 250] [--root bench/out/export]

The scale corpus (flows/corpora/scale.py: mostly text QA and captions of small images, some
video QA, ASR and text-speech pairs) of N inputs is built once, ingest only (the ingest pool is
exported as the stage: every sample kind a stage holds; stage 3's text-speech pairs go too, as
`ingest` is not a stage-3 folder), with --per-shard samples a shard (the export's task size).
Each export then runs in a fresh process (Ray started with --num-cpus 1 or 2), timed from the
call to the return (Ray's start, with its worker processes started and the export's modules
imported in them, is timed apart), and the three exports must hold the same bytes.
Per case: seconds, samples per second, the speed-up over the baseline.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, sys, time
from flows.export.stage import export_stage
out, dest, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
ex, started = None, 0.0
if workers:
    t = time.perf_counter()
    from flows.build.ray_exec import RayDataExecutor
    ex = RayDataExecutor(num_cpus=workers)
    def warm(_):  # each worker process started and the export's modules imported
        import flows.export.shard, PIL.Image  # noqa: F401
        time.sleep(0.5)
    list(ex.map_tasks(warm, [(i, None) for i in range(workers)]))
    started = time.perf_counter() - t
t = time.perf_counter()
res = export_stage(out, "ingest", dest, skip_validation=True, executor=ex)
print(json.dumps({"seconds": time.perf_counter() - t, "ray_start": started,
                  "records": res.records, "skipped": dict(res.skipped)}))
"""


def digest(root: Path) -> str:
    """One hash over every file of an export but export.json (its time); the DEST path in the
    two config files is replaced, so exports to different folders compare."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "export.json":
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes().replace(str(root).encode(), b"DEST"))
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--per-shard", type=int, default=250)
    ap.add_argument("--root", default=str(ROOT / "bench" / "out" / "export"))
    args = ap.parse_args()
    from flows.build.executors import LocalExecutor
    from flows.build.pipeline import build
    from flows.corpora.scale import make_scale_inputs
    from schemas.config import load_config

    root = Path(args.root)
    shutil.rmtree(root, ignore_errors=True)
    cfg = load_config(make_scale_inputs(root / "in", args.n, max_samples=args.per_shard))
    t = time.perf_counter()
    build(cfg, str(root / "out"), executor=LocalExecutor(), stages=[])
    print(f"built the ingest of {args.n} inputs in {time.perf_counter() - t:.0f} s", flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rows = []
    for label, workers in (("one process", 0), ("Ray, 1 worker", 1), ("Ray, 2 workers", 2)):
        dest = root / f"dest_{workers}"
        run = subprocess.run([sys.executable, "-c", CHILD, str(root / "out"), str(dest), str(workers)],
                             capture_output=True, text=True, env=env, check=True)
        got = json.loads(run.stdout.strip().splitlines()[-1])
        got.update(label=label, digest=digest(dest))
        rows.append(got)
        print(f"{label}: {got['records']} records in {got['seconds']:.1f} s "
              f"({got['records'] / got['seconds']:.0f} samples/s; Ray start {got['ray_start']:.1f} s)",
              flush=True)
    base = rows[0]
    assert all(r["digest"] == base["digest"] and r["records"] == base["records"] for r in rows), rows
    print(f"\n| export of {base['records']} samples ({args.n} inputs, {args.per_shard} a shard) "
          "| seconds | samples/s | vs one process |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['label']} | {r['seconds']:.1f} | {r['records'] / r['seconds']:.0f} | "
              f"{base['seconds'] / r['seconds']:.2f}x |")
    print("\nthe three exports are byte-identical (sha256 over every file but export.json)")


if __name__ == "__main__":
    main()
