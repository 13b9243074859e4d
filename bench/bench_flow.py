"""The Prefect + Ray flow against the same build functions in a plain loop, in one run.

    .venv/bin/python bench/bench_flow.py [--images 1500] [--repeat 3] [--demo-repeat 3]
                                         [--cases loop,command,flow-1,...]

Two caption sources of N 320x240 JPEGs each (every image tiled), no stages. The baseline is
`flows.build.pipeline.build` in this process (imports done). The other rows are whole commands, start-up
included: `vita-corpus build --executor local` (the plain loop as a command; also pinned to one
core, the fair baseline of a flow given one Ray CPU), and `vita-corpus run` (the flow:
Prefect's temporary API server and a local Ray of 1 or 2 CPUs started and stopped by the run;
a transform task per partition of 500 inputs, submitted in input order; a shard task per
source that follows its partitions' staging files as they are written), also against a
Prefect server that is already running, as a scheduled deployment has, and on the same images
in one source (its partitions spread over both workers). PREFECT_HOME is kept between runs, as
a nightly's is; its first use (database migrations) is timed apart. Each case runs --repeat
times, round-robin (a slow spell of a shared machine falls on every case alike), and the median
is reported, with the largest staging folder seen during the flow runs. Then the flow's fixed
costs: the same commands on one image per source, and the start-up steps timed one by one.
Last, the demo corpus (`vita-corpus demo`'s inputs: every format, bad inputs, speech, every
stage and its validation) end to end: the plain command against the flow with 1 and 2 Ray
workers, --demo-repeat times round-robin.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from flows.build.pipeline import build  # noqa: E402
from flows.corpora.demo import make_demo_inputs  # noqa: E402
from schemas.config import load_config  # noqa: E402

from conftest import write_image  # noqa: E402

BIN = Path(sys.executable).parent


def corpus(root: Path, n: int, names: tuple[str, ...] = ("a", "b")) -> Path:
    sources = []
    for s in names:
        recs = []
        for i in range(n):
            write_image(root / s / f"{i}.jpg", (320, 240), seed=i)
            recs.append({"id": f"{s}{i}", "image": f"{i}.jpg", "conversations": [
                {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "x"}]})
        (root / s / "recs.json").write_text(json.dumps(recs))
        sources.append({"name": s, "kind": "caption", "format": "llava", "path": f"{s}/recs.json"})
    (root / "corpus.yaml").write_text(yaml.safe_dump({"name": "bench", "sources": sources,
                                                      "shard": {"max_samples": 200}}))
    return root / "corpus.yaml"


def env_for(home: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               RAY_TMPDIR=tempfile.mkdtemp(prefix="ray", dir="/tmp"), **extra)
    for k in ("PREFECT_API_URL", "RAY_ADDRESS"):
        if k not in extra:
            env.pop(k, None)
    return env


PEAK_STAGING: dict[str, int] = {}  # the largest staging folder seen under each OUT


def _watch_staging(out: Path, stop: threading.Event) -> None:
    peak = 0
    while not stop.wait(0.5):
        total = 0
        for p in (out / "staging").rglob("*"):
            try:
                total += p.stat().st_size
            except OSError:  # removed meanwhile
                pass
        peak = max(peak, total)
    PEAK_STAGING[str(out)] = peak


def timed(cmd: list[str], env: dict[str, str], out: Path | None = None) -> float:
    """Seconds the command took; with `out`, its staging folder's peak size is recorded."""
    stop = threading.Event()
    watch = threading.Thread(target=_watch_staging, args=(out, stop)) if out else None
    if watch:
        watch.start()
    t0 = time.perf_counter()
    try:
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        return time.perf_counter() - t0
    finally:
        stop.set()
        if watch:
            watch.join()


def flow_cmd(cfg: Path, out: Path, cpus: int, stages: str = "none") -> list[str]:
    return [str(BIN / "vita-corpus"), "run", "-c", str(cfg), "-o", str(out), "--stages", stages,
            "--num-cpus", str(cpus)]


def plain_cmd(cfg: Path, out: Path, stages: str = "none") -> list[str]:
    return [str(BIN / "vita-corpus"), "build", "-c", str(cfg), "-o", str(out), "--stages", stages,
            "--executor", "local", "-q"]


def demo(tmp: Path, repeat: int) -> list[tuple[str, list[float]]]:
    """The demo corpus end to end (every stage, validation): plain command, flow 1 and 2."""
    cfg = make_demo_inputs(tmp / "demo-in")
    home = tmp / "prefect-demo"
    timed(flow_cmd(cfg, tmp / "demo-first", 2, "all"), env_for(home))  # migrations, TTS warm
    cases = [("plain command: vita-corpus build --executor local", lambda out: timed(
                 plain_cmd(cfg, out, "all"), env_for(home))),
             ("flow command: vita-corpus run, 1 Ray worker", lambda out: timed(
                 flow_cmd(cfg, out, 1, "all"), env_for(home))),
             ("flow command: vita-corpus run, 2 Ray workers", lambda out: timed(
                 flow_cmd(cfg, out, 2, "all"), env_for(home)))]
    times = round_robin(cases, repeat, tmp, "demo")
    return [(name, t) for (name, _), t in zip(cases, times, strict=True)]


def round_robin(cases: list[tuple[str, Callable[[Path], float]]], repeat: int, tmp: Path,
                prefix: str) -> list[list[float]]:
    """Each case's seconds, `repeat` runs each, round-robin, so that a slow spell of the
    machine falls on every case alike; run r of case i writes tmp/<prefix>-<r>-<i>."""
    times: list[list[float]] = [[] for _ in cases]
    for r in range(repeat):
        for i, (_, run) in enumerate(cases):
            times[i].append(run(tmp / f"{prefix}-{r}-{i}"))
            shutil.rmtree(tmp / f"{prefix}-{r}-{i}")
            # The disk's writeback of this case's gigabytes must not fall on the next one.
            os.sync()
    return times


STEPS = r"""
import os, sys, tempfile, time
sys.path.insert(0, sys.argv[1])
t = time.perf_counter()
def lap(name):
    global t
    now = time.perf_counter()
    print(f"STEP {now - t:.2f} {name}", flush=True)
    t = now
import flows.cli, flows.nightly
lap("driver imports (flows.cli, flows.nightly; Prefect, no torch)")
from flows import prefect_server
prefect_server.start_in_background().api_url(); prefect_server._server.stop()
lap("temporary server start, fresh PREFECT_HOME (database migrations)")
prefect_server.start_in_background().api_url()
lap("temporary server start, PREFECT_HOME used before")
import ray
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
         _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"))
lap("ray.init: a local Ray of 2 CPUs")
@ray.remote
def first_task():
    import flows.nightly, flows.build.work
ray.get([first_task.remote(), first_task.remote()])
lap("first task on 2 new Ray workers: import flows.nightly, flows.build.work (torch)")
from flows.build.ray_exec import shutdown_ray
shutdown_ray()
lap("ray.shutdown (the flow's: the local autoscaler monitor killed first)")
prefect_server._server.stop()
lap("temporary server stop")
"""


def prefect_server(home: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    api = f"http://127.0.0.1:{port}/api"
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env_for(home),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.time() + 180
    while time.time() < end:
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                if r.status == 200:
                    return server, api
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError("the Prefect server did not start in 180 s")


def in_process(cfg: Path, out: Path) -> float:
    t0 = time.perf_counter()
    build(load_config(cfg), str(out))
    return time.perf_counter() - t0


CASES = ["loop", "command", "taskset", "flow-1", "flow-2", "server", "one-source"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1500, help="images per source")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each case")
    ap.add_argument("--cases", default="",
                    help="comma-separated cases to run (default: all): loop,command,taskset,"
                         "flow-1,flow-2,server,one-source")
    ap.add_argument("--demo-repeat", type=int, default=3,
                    help="runs of each demo corpus case (0: skip the demo corpus)")
    args = ap.parse_args()
    chosen = args.cases.split(",") if args.cases else CASES
    if set(chosen) - set(CASES) or not {"loop", "command"} <= set(chosen):
        raise SystemExit(f"--cases: loop and command (the baselines), and any of "
                         f"{', '.join(CASES[2:])}; got {args.cases}")
    load = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="vc-flow-"))
    cfg, tiny = corpus(tmp / "in", args.images), corpus(tmp / "tiny", 1)
    one = corpus(tmp / "one", 2 * args.images, names=("a",))
    home = tmp / "prefect"

    first_use = timed(flow_cmd(tiny, tmp / "tiny-first", 2), env_for(home))
    server, api = prefect_server(tmp / "prefect-server")
    try:
        timed(flow_cmd(tiny, tmp / "tiny-server-first", 2), env_for(home, PREFECT_API_URL=api))
        every: list[tuple[str, str, Callable[[Path], float]]] = [
            ("loop", "plain loop: flows.build.pipeline.build, in-process, imports done",
             lambda out: in_process(cfg, out)),
            ("command", "plain command: vita-corpus build --executor local",
             lambda out: timed(plain_cmd(cfg, out), env_for(home))),
            ("taskset", "plain command on 1 core (taskset -c 0)",
             lambda out: timed(["taskset", "-c", "0", *plain_cmd(cfg, out)], env_for(home))),
            ("flow-1", "flow command: vita-corpus run, 1 Ray worker",
             lambda out: timed(flow_cmd(cfg, out, 1), env_for(home), out)),
            ("flow-2", "flow command: vita-corpus run, 2 Ray workers",
             lambda out: timed(flow_cmd(cfg, out, 2), env_for(home), out)),
            ("server", "flow command, 2 Ray workers, Prefect server already running",
             lambda out: timed(flow_cmd(cfg, out, 2), env_for(home, PREFECT_API_URL=api), out)),
            ("one-source", "flow command, 2 Ray workers, the same images in one source",
             lambda out: timed(flow_cmd(one, out, 2), env_for(home), out))]
        assert [key for key, _, _ in every] == CASES
        cases = [(name, run) for key, name, run in every if key in chosen]
        times = round_robin(cases, args.repeat, tmp, "out")
        fixed = [("plain command", timed(plain_cmd(tiny, tmp / "tiny-plain"), env_for(home))),
                 ("flow command, 1 Ray worker", timed(flow_cmd(tiny, tmp / "tiny-flow-1", 1),
                                                      env_for(home))),
                 ("flow command, 2 Ray workers", timed(flow_cmd(tiny, tmp / "tiny-flow", 2),
                                                       env_for(home))),
                 ("flow command, 2 Ray workers, Prefect server running",
                  timed(flow_cmd(tiny, tmp / "tiny-flow-server", 2),
                        env_for(home, PREFECT_API_URL=api)))]
    finally:
        server.terminate()
        server.wait(timeout=30)
    steps = subprocess.run([sys.executable, "-c", STEPS, str(Path(__file__).resolve().parent.parent)],
                           env=env_for(tmp / "prefect-steps"), check=True, capture_output=True,
                           text=True).stdout
    demo_times = demo(tmp, args.demo_repeat) if args.demo_repeat else []
    n = 2 * args.images
    print(f"\n{n} images in two sources; {os.cpu_count()} cores; load average at the start "
          f"{load:.2f}, at the end {os.getloadavg()[0]:.2f}")
    base = [statistics.median(t) for t in times[:2]]
    print(f"median of {args.repeat} runs each (min-max in brackets)\n")
    print("| case | seconds | images/s | vs plain loop | vs plain command | peak staging MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for i, ((name, _), t) in enumerate(zip(cases, times, strict=True)):
        m = statistics.median(t)
        peaks = [PEAK_STAGING[k] for r in range(args.repeat)
                 if (k := str(tmp / f"out-{r}-{i}")) in PEAK_STAGING]
        peak = f"{max(peaks) / 1e6:,.0f}" if peaks else "-"
        print(f"| {name} | {m:.1f} ({min(t):.1f}-{max(t):.1f}) | {n / m:.1f} | "
              f"{m / base[0] - 1:+.0%} | {m / base[1] - 1:+.0%} | {peak} |")
    print("\nThe same commands on 1 image per source (their fixed cost):\n")
    print("| command | seconds |\n|---|---:|")
    print(f"| flow command, 2 Ray workers, first use of a fresh PREFECT_HOME | {first_use:.1f} |")
    for name, t in fixed:
        print(f"| {name} | {t:.1f} |")
    print("\nStart-up steps of the flow command, one at a time:\n")
    print("| step | seconds |\n|---|---:|")
    for line in steps.splitlines():
        if line.startswith("STEP "):
            _, secs, name = line.split(" ", 2)
            print(f"| {name} | {secs} |")
    if demo_times:
        print(f"\nThe demo corpus end to end (every stage, validation), median of "
              f"{args.demo_repeat} runs:\n")
        print("| command | seconds | vs plain command |\n|---|---:|---:|")
        base_demo = statistics.median(demo_times[0][1])
        for name, t in demo_times:
            m = statistics.median(t)
            print(f"| {name} | {m:.1f} ({min(t):.1f}-{max(t):.1f}) | {m / base_demo - 1:+.0%} |")


if __name__ == "__main__":
    main()
