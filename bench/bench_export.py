"""Export speed: a stage of N samples exported --format vita in one process (the baseline) and
as shard tasks on 1 and 2 Ray workers, in the same run.

    .venv/bin/python bench/bench_export.py [--n 20000] [--per-shard 250] [--repeat 2] [--reuse]
                                           [--root bench/out/export]

The scale corpus (flows/corpora/scale.py: mostly text QA and captions of small images, some
video QA, ASR and text-speech pairs) of N inputs is built once, ingest only (the ingest pool is
exported as the stage: every sample kind a stage holds; stage 3's text-speech pairs go too, as
`ingest` is not a stage-3 folder), with --per-shard samples a shard (the export's task size).
Each export then runs in a fresh process (Ray started with --num-cpus 1 or 2), timed from the
call to the return (Ray's start, with its worker processes started and the export's modules
imported in them, is timed apart), and the three exports must hold the same bytes.
The cases run round-robin --repeat times (a shared machine's load then falls on each of them
alike) and each case's fastest run is reported: seconds, samples per second, the speed-up over
the baseline, and the CPU seconds spent in the shard tasks (wherever they ran, ffmpeg
included) and in the driver (Ray's start excluded), which a shared machine's load changes
less than it changes wall time. --reuse keeps an ingest built earlier under --root.
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
import json, resource, sys, time
from flows.export.shard import export_shard
from flows.export.stage import _InProcess, export_stage
out, dest, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])

def cpu_seconds():
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime  # children: ffmpeg

def timed(task):  # a shard's export with the CPU its process (and ffmpeg) spent on it
    c = cpu_seconds()
    r = export_shard(task)
    r.cpu_s = cpu_seconds() - c
    return r

class Timed:  # the executor, with each task's CPU summed on the way back
    def __init__(self, inner):
        self.inner, self.cpu = inner, 0.0
    def map_tasks(self, fn, items):
        for tag, r in self.inner.map_tasks(timed, items):
            self.cpu += r.cpu_s
            yield tag, r

inner, started = _InProcess(), 0.0
if workers:
    t = time.perf_counter()
    from flows.build.ray_exec import RayDataExecutor
    inner = RayDataExecutor(num_cpus=workers)
    def warm(_):  # each worker process started and the export's modules imported
        import flows.export.shard, PIL.Image  # noqa: F401
        time.sleep(0.5)
    list(inner.map_tasks(warm, [(i, None) for i in range(workers)]))
    started = time.perf_counter() - t
ex = Timed(inner)
t, c = time.perf_counter(), cpu_seconds()
res = export_stage(out, "ingest", dest, skip_validation=True, executor=ex)
print(json.dumps({"seconds": time.perf_counter() - t, "ray_start": started,
                  "tasks_cpu": ex.cpu, "driver_cpu": cpu_seconds() - c - (0 if workers else ex.cpu),
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
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--reuse", action="store_true")
    ap.add_argument("--root", default=str(ROOT / "bench" / "out" / "export"))
    args = ap.parse_args()
    from flows.build.executors import LocalExecutor
    from flows.build.pipeline import build
    from flows.corpora.scale import make_scale_inputs
    from schemas.config import load_config

    root = Path(args.root)
    if not (args.reuse and (root / "out" / "ingest").exists()):
        shutil.rmtree(root, ignore_errors=True)
        cfg = load_config(make_scale_inputs(root / "in", args.n, max_samples=args.per_shard))
        t = time.perf_counter()
        build(cfg, str(root / "out"), executor=LocalExecutor(), stages=[])
        print(f"built the ingest of {args.n} inputs in {time.perf_counter() - t:.0f} s", flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cases = (("one process", 0), ("Ray, 1 worker", 1), ("Ray, 2 workers", 2))
    best: dict[str, dict] = {}
    for _ in range(args.repeat):
        for label, workers in cases:
            dest = root / f"dest_{workers}"
            run = subprocess.run([sys.executable, "-c", CHILD, str(root / "out"), str(dest),
                                  str(workers)], capture_output=True, text=True, env=env, check=True)
            got = json.loads(run.stdout.strip().splitlines()[-1])
            got.update(label=label, digest=digest(dest))
            rate = got["records"] / got["seconds"]
            print(f"{label}: {got['records']} records in {got['seconds']:.1f} s ({rate:.0f} "
                  f"samples/s; Ray start {got['ray_start']:.1f} s; CPU s: shard tasks "
                  f"{got['tasks_cpu']:.1f}, driver {got['driver_cpu']:.1f})", flush=True)
            if label not in best or got["seconds"] < best[label]["seconds"]:
                best[label] = got
    rows = [best[label] for label, _ in cases]
    base = rows[0]
    assert all(r["digest"] == base["digest"] and r["records"] == base["records"] for r in rows), rows
    print(f"\n| export of {base['records']} samples ({args.n} inputs, {args.per_shard} a shard; "
          f"best of {args.repeat}) | seconds | samples/s | vs one process | CPU s in shard tasks "
          "| CPU s in the driver |\n|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['label']} | {r['seconds']:.1f} | {r['records'] / r['seconds']:.0f} | "
              f"{base['seconds'] / r['seconds']:.2f}x | {r['tasks_cpu']:.1f} | {r['driver_cpu']:.1f} |")
    print("\nthe three exports are byte-identical (sha256 over every file but export.json)")


if __name__ == "__main__":
    main()
