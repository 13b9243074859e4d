"""The driver's work per input, and a text-only corpus built whole at two sizes (issue 23).

    .venv/bin/python bench/bench_driver.py [--n 10000] [--sizes 10000,100000] [--num-cpus 2]
                                           [--repeat 3] [--worker-inputs 2000]
                                           [--ingest-speech] [--scale-n 0]
                                           [--root bench/out/driver]

The corpus: the scale corpus's text QA (flows/corpora/scale.py: English and Chinese questions
that differ from record to record, follow-up turns, a malformed element every 1,000 and a
duplicate id every 700), one `llava` source of kind text, 1,000 samples a shard. As a new user
builds it, the ingest does not speak (`--ingest-speech`: it speaks half of the questions, as
the scale corpus's config does); stage 2.2 speaks half of the questions it selects.

1. The driver (in this process, N = --n): the planner's loop (SourcePlanner.partitions, every
   partition consumed, none written) in CPU microseconds per input, parsed (the records made
   and serialised in the driver, as before) and light (raw text and ids; the workers make the
   records), alternately, --repeat times each (the least is kept: the machine is shared). Then
   the worker: write_partition on the first --worker-inputs inputs of each plan (after one
   partition to warm up), CPU microseconds per input of the process and the TTS helper it
   starts, the least of --repeat. "Workers one driver keeps busy" = the worker's us per input
   / the driver's.
   --scale-n N: the driver alone (parsed and light) over every source of the scale corpus's
   mix (captions and image QA with images, video, ASR, text-speech pairs, text QA).
2. The whole build at each of --sizes, each in a fresh process on a local Ray of --num-cpus
   CPUs: the ingest, each stage of the default recipes, the report, then validation in a
   process of its own; seconds per phase, and samples/s (inputs over the whole: build +
   validation) against the first size, in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHILD_BUILD = r"""
import json, resource, sys, time
from flows.build.pipeline import finish, ingest, prepare
from flows.build.ray_exec import RayDataExecutor
from flows.build.stages import build_stage
from schemas.config import load_config
from schemas.recipes import DEFAULT_RECIPES

cfg_path, out, cpus = sys.argv[1], sys.argv[2], int(sys.argv[3])
def cpu_s():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
t0 = time.perf_counter()
ex = RayDataExecutor(num_cpus=cpus)
t_ray = time.perf_counter()
recipes = list(DEFAULT_RECIPES)
cfg = prepare(load_config(cfg_path), out, stages=recipes)
started, c0 = time.time(), cpu_s()
t1 = time.perf_counter()
stats, tts = ingest(cfg, out, executor=ex)
t_ingest = time.perf_counter()
driver_cpu = cpu_s() - c0
summaries, stage_s = {}, {}
for r in recipes:
    t = time.perf_counter()
    summaries[r.stage] = build_stage(cfg, out, r, executor=ex)
    stage_s[r.stage] = time.perf_counter() - t
t_stages = time.perf_counter()
from flows.build.pipeline import partitions_report
from flows.build.plan import range_size
report = finish(cfg, out, "ingest", started, stats, tts, summaries,
                extra={"partitions": partitions_report(stats, 1, range_size(cfg))})
t_report = time.perf_counter()
ex.close()
inputs = report["totals"]["inputs"]
print("RESULT " + json.dumps({
    "inputs": inputs, "written": report["totals"]["written"],
    "rejected": report["totals"]["rejected"], "accounted": report["accounted"],
    "ray_start_s": t_ray - t0, "ingest_s": t_ingest - t1, "stage_s": stage_s,
    "stages_s": t_stages - t_ingest, "report_s": t_report - t_stages,
    "build_s": t_report - t0,
    "stage_samples": {k: sum(p["selected"] for p in v["pools"].values())
                      for k, v in summaries.items()},
    "driver_cpu_us_per_input_in_build": 1e6 * driver_cpu / max(1, inputs),
    "driver_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}), flush=True)
"""


def make_text_corpus(root: Path, n: int, ingest_speech: bool, tts_cache: str | None = None
                     ) -> Path:
    """`n` text QA records of the scale corpus (questions all different) as one source."""
    import yaml

    from flows.corpora.scale import _ArrayWriter, _text_records

    root.mkdir(parents=True, exist_ok=True)
    with open(root / "text.json", "w", encoding="utf-8") as f:
        w = _ArrayWriter(f)
        for rec in _text_records(n, random.Random(0)):
            w.raw(rec) if isinstance(rec, str) else w.add(rec)
        w.close()
    speech: dict = {"enabled": ingest_speech, "fraction": 0.5}
    if tts_cache:
        speech["cache"] = tts_cache
    cfg = {"name": f"text-{n}", "seed": 1234, "shard": {"max_samples": 1000},
           "transforms": {"speech": speech},
           "sources": [{"name": "scale_text", "kind": "text", "format": "llava",
                        "path": "text.json"}]}
    (root / "corpus.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return root / "corpus.yaml"


def driver_us(cfg, out: Path, light: bool) -> tuple[float, int, list]:
    """(CPU us per input of the planner's loop over every source, inputs, the partitions)
    into a fresh `out`."""
    from flows.build.plan import SourcePlanner

    shutil.rmtree(out, ignore_errors=True)
    cpu, parts = 0.0, []
    for src in cfg.sources:
        planner = SourcePlanner(cfg, src, str(out), light=light)
        c0 = time.process_time()
        parts += list(planner.partitions())
        cpu += time.process_time() - c0
        planner.abort()
    n = sum(len(p.inputs) for p in parts)
    return 1e6 * cpu / n, n, parts


def worker_us(cfg, out: Path, parts: list, inputs: int) -> float:
    """CPU us per input of write_partition on the first `inputs` inputs of `parts` (this
    process, and the TTS helper process it starts, if any)."""
    import psutil

    from flows.build.partitions import write_partition

    me = psutil.Process()

    def cpu() -> float:
        t = me.cpu_times()
        own = t.user + t.system
        for c in me.children(recursive=True):
            try:
                ct = c.cpu_times()
                own += ct.user + ct.system + ct.children_user + ct.children_system
            except psutil.NoSuchProcess:
                pass
        return own

    shutil.rmtree(out, ignore_errors=True)
    write_partition(cfg, str(out), parts[0])  # warm: imports, the transform function
    done, c0 = 0, cpu()
    for p in parts[1:]:
        if done >= inputs:
            break
        write_partition(cfg, str(out), p)
        done += len(p.inputs)
    return 1e6 * (cpu() - c0) / max(1, done)


def driver_case(args: argparse.Namespace, root: Path) -> dict:
    from schemas.config import load_config

    # the synthesis cache under each worker run's fresh OUT: every run speaks (--ingest-speech)
    cfg_path = make_text_corpus(root / f"in-driver-{args.n}", args.n, args.ingest_speech)
    cfg = load_config(cfg_path)
    us: dict[str, list[float]] = {"parsed": [], "light": []}
    parts = {}
    for _ in range(args.repeat):
        for mode in ("parsed", "light"):
            u, n, parts[mode] = driver_us(cfg, root / f"plan-{mode}", mode == "light")
            us[mode].append(u)
    row = {"n": n, "driver_parsed_us": min(us["parsed"]), "driver_light_us": min(us["light"]),
           "driver_runs_us": us}
    # the workers of each plan (a light plan's worker also makes the records)
    for mode in ("parsed", "light"):
        row[f"worker_{mode}_us"] = min(worker_us(cfg, root / f"work-{mode}", parts[mode],
                                                 args.worker_inputs)
                                       for _ in range(args.repeat))
    row["workers_per_driver_parsed"] = row["worker_parsed_us"] / row["driver_parsed_us"]
    row["workers_per_driver_light"] = row["worker_light_us"] / row["driver_light_us"]
    for mode in ("parsed", "light"):
        shutil.rmtree(root / f"plan-{mode}", ignore_errors=True)
        shutil.rmtree(root / f"work-{mode}", ignore_errors=True)
    return row


def scale_mix_case(args: argparse.Namespace, root: Path) -> dict:
    """The driver alone on the scale corpus's mix (every source; N = --scale-n)."""
    from flows.corpora.scale import make_scale_inputs
    from schemas.config import load_config

    cfg = load_config(make_scale_inputs(root / f"in-scale-{args.scale_n}", args.scale_n))
    us: dict[str, list[float]] = {"parsed": [], "light": []}
    for _ in range(args.repeat):
        for mode in ("parsed", "light"):
            u, n, _ = driver_us(cfg, root / f"plan-scale-{mode}", mode == "light")
            us[mode].append(u)
        for mode in ("parsed", "light"):
            shutil.rmtree(root / f"plan-scale-{mode}", ignore_errors=True)
    return {"n": n, "driver_parsed_us": min(us["parsed"]), "driver_light_us": min(us["light"]),
            "driver_runs_us": us}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10000, help="records of the driver case")
    ap.add_argument("--sizes", default="10000,100000", help="records of the whole builds")
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--worker-inputs", type=int, default=2000)
    ap.add_argument("--scale-n", type=int, default=0,
                    help="also the driver alone on the scale corpus's mix of N records")
    ap.add_argument("--ingest-speech", action="store_true",
                    help="the ingest speaks half of the questions (as the scale corpus's config)")
    ap.add_argument("--root", default=str(ROOT / "bench" / "out" / "driver"))
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--results", default=None, help="write the figures to this JSON file")
    args = ap.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the start", flush=True)
    results: dict = {"args": vars(args), "load_start": os.getloadavg()}
    if args.n:
        d = driver_case(args, root)
        results["driver"] = d
        print(f"driver, N={d['n']:,}: parsed {d['driver_parsed_us']:.1f} us/input, light "
              f"{d['driver_light_us']:.1f} us/input; worker {d['worker_parsed_us']:.0f} us/input "
              f"(parsed plan), {d['worker_light_us']:.0f} (light plan); workers per driver "
              f"{d['workers_per_driver_parsed']:.0f} -> {d['workers_per_driver_light']:.0f}",
              flush=True)
    if args.scale_n:
        d = scale_mix_case(args, root)
        results["scale_mix_driver"] = d
        print(f"driver on the scale mix, N={d['n']:,}: parsed {d['driver_parsed_us']:.1f} "
              f"us/input, light {d['driver_light_us']:.1f}", flush=True)
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               RAY_TMPDIR=tempfile.mkdtemp(prefix="ray", dir="/tmp"),
               RAY_DATA_DISABLE_PROGRESS_BARS="1")
    env.pop("RAY_ADDRESS", None)
    from bench_scale import CHILD_VALIDATE, run_child  # the scale bench's child runs

    rows = []
    for n in [int(s) for s in args.sizes.split(",") if s]:
        inputs, out = root / f"in-text-{n}", root / f"out-text-{n}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        cfg = make_text_corpus(inputs, n, args.ingest_speech)
        row = {"n": n, "generate_s": time.perf_counter() - t0, "load_before": os.getloadavg()[0]}
        print(f"[{time.strftime('%H:%M:%S')}] N={n:,}: building", flush=True)
        row.update(run_child(CHILD_BUILD, [str(cfg), str(out), str(args.num_cpus)], env,
                             root / "bench_driver.log"))
        row.update(run_child(CHILD_VALIDATE, [str(out)], env, root / "bench_driver.log"))
        row["whole_s"] = row["build_s"] + row["validate_s"]
        row["samples_per_s"] = row["inputs"] / row["whole_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        results["builds"] = rows
        if args.results:
            Path(args.results).write_text(json.dumps(results, indent=1) + "\n")
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    if rows:
        stages = list(rows[0]["stage_s"])
        print("\n| N | Ray start s | ingest s | " + " | ".join(f"stage {s} s" for s in stages)
              + " | report s | validate s | whole s | samples/s | vs first | driver us/input "
              "in the build | accounted | validated |")
        print("|" + " --- |" * (11 + len(stages)))
        for r in rows:
            rel = f"{r['samples_per_s'] / rows[0]['samples_per_s'] - 1:+.0%}"
            print(f"| {r['n']:,} | {r['ray_start_s']:.1f} | {r['ingest_s']:.1f} | "
                  + " | ".join(f"{r['stage_s'][s]:.1f}" for s in stages)
                  + f" | {r['report_s']:.1f} | {r['validate_s']:.1f} | {r['whole_s']:.1f} "
                  f"| {r['samples_per_s']:.0f} | {rel} "
                  f"| {r['driver_cpu_us_per_input_in_build']:.0f} | {r['accounted']} "
                  f"| {r['validate_passed']} |")
    if args.results:
        Path(args.results).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
