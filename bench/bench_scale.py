"""How cost grows: the same build at N = 10,000, 100,000 and 1,000,000 records, in one run.

    .venv/bin/python bench/bench_scale.py [--sizes 10000,100000,1000000] [--num-cpus 2]
                                          [--root bench/out/scale] [--keep] [--no-validate]

For each N: the scale corpus (flows/corpora/scale.py: mostly text QA and captions of small
images, some video, ASR and text-speech pairs, bad inputs) is generated, then a fresh process
builds it on a local Ray of --num-cpus CPUs (ingest; every stage; the report), timing each
step, while a thread samples the resident memory of the Ray workers. Every question differs,
so stage 2.2 (on the workers) synthesizes all that it speaks; with --question-pool the
questions come from a pool of about twenty, spoken into the synthesis cache (shared by every
N) before the first build, as a nightly's warm cache would serve them. Validation
(`flows.validation.gate.validate(out)`, as it is) runs after, in a process of its own, timed apart.
The trainer's loader (training/data.py) then reads --loader-batches batches of stage 1.3 in
another process (its resident memory after 100 batches, half way and at the end). Per N: seconds per
step, samples/s (inputs of the ingest per second of the build), the peak RSS
of the driver (the build's process; ru_maxrss) and of a worker, the driver's and the workers'
CPU microseconds per input over the ingest, and the size of OUT. The first N is the baseline
the others are compared against, in the same run. OUT is deleted after each N unless --keep.

`--cases tiling` adds a case of --tiling-n 640x480 caption images only (13 tiles each, the
tiling workload InternVL's grid gives 4:3 photos), to compare the driver's CPU per input with a
tiling worker's. The driver's CPU is also measured idle for 3 s before the ingest (Ray's own
threads: a share of a core, paid per second, not per input); "net" is the per-input figure
without it, and "workers per driver" = (1 - that share) x worker us / driver net us.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHILD_BUILD = r"""
import json, os, resource, sys, threading, time
import psutil
from flows.build.pipeline import finish, ingest, prepare
from flows.build.ray_exec import RayDataExecutor
from flows.build.stages import build_stage
from schemas.config import load_config
from schemas.recipes import DEFAULT_RECIPES

cfg_path, out, cpus, with_stages = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
me = psutil.Process()
workers = {}  # pid -> (peak rss, last cpu seconds)
stop = threading.Event()

sampler_cpu = [0.0]  # this thread's own CPU, taken off the driver's

def sample():
    while not stop.is_set():
        t = time.thread_time()
        for p in me.children(recursive=True):
            try:
                if p.cmdline()[:1] and p.cmdline()[0].startswith("ray::"):
                    rss, cpu = p.memory_info().rss, sum(p.cpu_times()[:2])
                    old = workers.get(p.pid, (0, 0.0))
                    workers[p.pid] = (max(old[0], rss), max(old[1], cpu))
            except (psutil.NoSuchProcess, psutil.AccessDenied, IndexError):
                pass
        sampler_cpu[0] += time.thread_time() - t
        stop.wait(0.5)

def cpu_s():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

threading.Thread(target=sample, daemon=True).start()
t0 = time.perf_counter()
ex = RayDataExecutor(num_cpus=cpus)
t_ray = time.perf_counter()
recipes = list(DEFAULT_RECIPES) if with_stages else []
cfg = prepare(load_config(cfg_path), out, stages=recipes)
# the driver's CPU while idle (Ray's own threads): a share of a core that grows with the
# wall time, not with the inputs; taken off the per-input figure below
b0, bs0, bt0 = cpu_s(), sampler_cpu[0], time.perf_counter()
time.sleep(3)
background = (cpu_s() - b0 - (sampler_cpu[0] - bs0)) / (time.perf_counter() - bt0)
idle_s = time.perf_counter() - bt0  # not counted in the build's seconds
started = time.time()
t_ray_idle = time.perf_counter()
c0, s0 = cpu_s(), sampler_cpu[0]
w0 = sum(c for _, c in workers.values())
stats, tts = ingest(cfg, out, executor=ex)
t_ingest = time.perf_counter()
driver_cpu = cpu_s() - c0 - (sampler_cpu[0] - s0)
time.sleep(0.5)  # one more sample of the workers
worker_cpu = sum(c for _, c in workers.values()) - w0
summaries = {r.stage: build_stage(cfg, out, r, executor=ex) for r in recipes}  # on the workers
t_stages = time.perf_counter()
try:  # the partitions' figures (what the worker tasks measured), where the build has them
    from flows.build.pipeline import partitions_report
    from flows.build.plan import range_size
    extra = {"partitions": partitions_report(stats, 1, range_size(cfg))}
except ImportError:
    extra = {}
report = finish(cfg, out, "ingest", started, stats, tts, summaries, extra=extra)
t_report = time.perf_counter()
stop.set()
ex.close()
inputs = report["totals"]["inputs"]
work = list(report.get("partitions", {}).get("sources", {}).values())  # what the tasks measured
print("RESULT " + json.dumps({
    "task_cpu_us_per_input": 1e6 * sum(w.get("worker_cpu_s", 0) for w in work) / max(1, inputs),
    "task_peak_rss_mb": max((w.get("worker_peak_rss_mb", 0) for w in work), default=0),
    "tasks": sum(w.get("tasks", 0) for w in work),
    "inputs": inputs, "written": report["totals"]["written"],
    "rejected": report["totals"]["rejected"], "accounted": report["accounted"],
    "stage_samples": {k: sum(p["selected"] for p in v["pools"].values())
                      for k, v in summaries.items()},
    "ray_start_s": t_ray - t0, "ingest_s": t_ingest - t_ray - idle_s, "stages_s": t_stages - t_ingest,
    "report_s": t_report - t_stages, "build_s": t_report - t0 - idle_s,
    "driver_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "worker_peak_mb": max((r for r, _ in workers.values()), default=0) / 2**20,
    "workers_seen": len(workers),
    "driver_cpu_us_per_input": 1e6 * driver_cpu / max(1, inputs),
    "driver_background_share": background,
    "driver_net_us_per_input": 1e6 * (driver_cpu - background * (t_ingest - t_ray_idle))
                               / max(1, inputs),
    "worker_cpu_us_per_input": 1e6 * worker_cpu / max(1, inputs),
}), flush=True)
"""

CHILD_VALIDATE = r"""
import json, resource, sys, time
from flows.validation.gate import validate
t0 = time.perf_counter()
verdicts = validate(sys.argv[1])
print("RESULT " + json.dumps({
    "validate_s": time.perf_counter() - t0,
    "validate_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "validate_passed": all(v["passed"] for v in verdicts.values()),
    "validated_samples": sum(v["samples"] for v in verdicts.values())}), flush=True)
"""


CHILD_LOADER = r"""
import json, resource, sys, time
from training.data import LoaderSettings, StageLoader, list_shards
from training.loop import _texts
from training.template import ChatTemplate, train_tokenizer

files = list_shards(sys.argv[1])
tok = train_tokenizer(_texts(files[:2]), 1000)
loader = StageLoader(files, ChatTemplate(tok, 256), LoaderSettings("lm", 8, 4096, 0, 64))
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
t0, n, at = time.perf_counter(), 0, {}
for i, batch in enumerate(loader):
    n += len(batch["samples"])
    if i + 1 in (100, int(sys.argv[2]) // 2, int(sys.argv[2])):
        at[i + 1] = rss()
    if i + 1 >= int(sys.argv[2]):
        break
print("RESULT " + json.dumps({
    "loader_batches": i + 1, "loader_samples_per_s": n / (time.perf_counter() - t0),
    "loader_rss_mb_at": at,
    "loader_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)
"""


def run_child(code: str, args: list[str], env: dict[str, str], log: Path) -> dict:
    with open(log, "a") as f:
        proc = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=f, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"child failed ({proc.returncode}); see {log}\n{proc.stdout[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def tiling_inputs(root: Path, n: int) -> Path:
    """`n` captions over 40 distinct 640x480 JPEGs (13 tiles each)."""
    import yaml

    from flows.corpora.demo import make_image

    root.mkdir(parents=True, exist_ok=True)
    for i in range(40):
        make_image(root / "media" / f"p{i}.jpg", (640, 480), seed=i)
    with open(root / "cap.json", "w") as f:
        f.write("[\n" + ",\n".join(json.dumps({
            "id": f"t{i}", "image": f"p{i % 40}.jpg", "conversations": [
                {"from": "human", "value": "<image>\nDescribe."},
                {"from": "gpt", "value": f"Photo {i}."}]}) for i in range(n)) + "\n]\n")
    (root / "corpus.yaml").write_text(yaml.safe_dump({
        "name": "tiling", "sources": [{"name": "tiling", "kind": "caption", "format": "llava",
                                       "path": "cap.json", "media_root": "media"}]}))
    return root / "corpus.yaml"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--root", default=str(ROOT / "bench" / "out" / "scale"))
    ap.add_argument("--keep", action="store_true", help="keep each N's OUT")
    ap.add_argument("--no-validate", action="store_true")
    ap.add_argument("--no-stages", action="store_true")
    ap.add_argument("--question-pool", action="store_true",
                    help="questions from a small pool, spoken into the cache before the builds "
                         "(by default every question differs and stage 2.2 synthesizes them)")
    ap.add_argument("--no-loader", action="store_true")
    ap.add_argument("--loader-batches", type=int, default=2000,
                    help="batches of 8 the trainer's loader reads from stage 1.3 (RSS after 100, "
                         "half of these, and these)")
    ap.add_argument("--cases", default="", help="extra cases: tiling")
    ap.add_argument("--tiling-n", type=int, default=8000, help="captions in the tiling case")
    ap.add_argument("--results", default=None, help="write the figures to this JSON file")
    args = ap.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               RAY_TMPDIR=tempfile.mkdtemp(prefix="ray", dir="/tmp"),
               RAY_DATA_DISABLE_PROGRESS_BARS="1")
    env.pop("RAY_ADDRESS", None)
    log = root / "bench_scale.log"
    rows = []
    warmed = False
    # the tiling case first: it is short, and its figure should not wait on the largest build
    cases = [("tiling", args.tiling_n)] if "tiling" in args.cases else []
    cases += [("scale", int(s)) for s in args.sizes.split(",") if s]
    for kind, n in cases:
        from flows.corpora.scale import make_scale_inputs

        inputs, out = root / f"in-{kind}-{n}", root / f"out-{kind}-{n}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        if kind == "tiling":
            cfg = tiling_inputs(inputs, n)
        else:
            cfg = make_scale_inputs(inputs, n, tts_cache=str(root / "tts-cache"),
                                    question_pool=args.question_pool)
        gen_s = time.perf_counter() - t0
        if kind == "scale" and not warmed and args.question_pool:
            from flows.corpora.scale import warm_tts_cache

            t1 = time.perf_counter()
            made = warm_tts_cache(cfg, str(out))
            warmed = True
            print(f"synthesis cache: {made} sentences made in {time.perf_counter() - t1:.0f} s "
                  "(before any build; a nightly's cache is warm)", flush=True)
        print(f"[{time.strftime('%H:%M:%S')}] {kind} N={n}: inputs in {gen_s:.1f} s; building",
              flush=True)
        row = {"case": kind, "n": n, "generate_s": gen_s}
        with_stages = kind == "scale" and not args.no_stages
        row.update(run_child(CHILD_BUILD, [str(cfg), str(out), str(args.num_cpus),
                                           "1" if with_stages else "0"], env, log))
        print(f"[{time.strftime('%H:%M:%S')}]   built in {row['build_s']:.0f} s", flush=True)
        if with_stages and not args.no_validate:
            row.update(run_child(CHILD_VALIDATE, [str(out)], env, log))
            print(f"[{time.strftime('%H:%M:%S')}]   validated in {row['validate_s']:.0f} s",
                  flush=True)
        if with_stages and not args.no_loader:
            row.update(run_child(CHILD_LOADER, [str(out / "stage_1.3"), str(args.loader_batches)],
                                 env, log))
            print(f"[{time.strftime('%H:%M:%S')}]   loader: {row['loader_rss_mb_at']} MB RSS "
                  "after (batches)", flush=True)
        row["out_gb"] = du(out) / 2**30
        row["samples_per_s"] = row["inputs"] / row["build_s"]
        row["ingest_per_s"] = row["inputs"] / row["ingest_s"]
        # workers one driver keeps busy: until the inputs they finish take the core the
        # driver's own threads leave
        row["workers_per_driver"] = ((1 - row["driver_background_share"])
                                     * row["worker_cpu_us_per_input"]
                                     / max(row["driver_net_us_per_input"], 1e-9))
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.results:  # after every case, so a long run stopped early keeps what it measured
            Path(args.results).write_text(json.dumps(rows, indent=1) + "\n")
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    base = next((r for r in rows if r["case"] == "scale"), None)
    print("\n| case | N | build s | ingest s | stages s | report s | validate s | samples/s "
          "| vs first | driver peak MB | worker peak MB | driver us/input (net) | worker us/input "
          "| workers per driver | OUT GB |")
    print("|" + " --- |" * 15)
    for r in rows:
        rel = (f"{r['samples_per_s'] / base['samples_per_s'] - 1:+.0%}"
               if base and r["case"] == "scale" else "-")
        print(f"| {r['case']} | {r['n']:,} | {r['build_s']:.0f} | {r['ingest_s']:.0f} "
              f"| {r['stages_s']:.0f} | {r['report_s']:.1f} | "
              f"{r.get('validate_s', float('nan')):.0f} | {r['samples_per_s']:.0f} | {rel} "
              f"| {r['driver_peak_mb']:.0f} | {r['worker_peak_mb']:.0f} "
              f"| {r['driver_cpu_us_per_input']:.0f} ({r['driver_net_us_per_input']:.0f}) "
              f"| {r['worker_cpu_us_per_input']:.0f} | {r['workers_per_driver']:.0f} "
              f"| {r['out_gb']:.2f} |")


if __name__ == "__main__":
    main()
