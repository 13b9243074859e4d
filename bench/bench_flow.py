"""The Prefect + Ray flow against the same build functions in a plain loop, in one run.

    .venv/bin/python bench/bench_flow.py [--images 600]

Two caption sources of N small JPEGs each (every image tiled), no stages. The plain loop is
`flows.build.build` in this process; the flow is `vita-corpus run` (Prefect's ephemeral API, a
local Ray of 1 or 2 CPUs, one task per source), timed as a whole command, start-up included.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from flows.build import build  # noqa: E402
from schemas.config import load_config  # noqa: E402

from conftest import write_image  # noqa: E402


def corpus(root: Path, n: int) -> Path:
    sources = []
    for s in ("a", "b"):
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=600)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="vc-flow-"))
    cfg = corpus(tmp / "in", args.images)
    t0 = time.perf_counter()
    build(load_config(cfg), str(tmp / "plain"))
    plain = time.perf_counter() - t0
    rows = [("plain loop: flows.build.build, in-process", plain)]
    cli = str(Path(sys.executable).parent / "vita-corpus")
    for cpus in (1, 2):
        env = dict(os.environ, PREFECT_HOME=str(tmp / f"prefect{cpus}"),
                   PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   RAY_TMPDIR=tempfile.mkdtemp(prefix="ray", dir="/tmp"))
        env.pop("PREFECT_API_URL", None)
        t0 = time.perf_counter()
        subprocess.run([cli, "run", "-c", str(cfg), "-o", str(tmp / f"flow{cpus}"), "--stages",
                        "none", "--num-cpus", str(cpus)], env=env, check=True,
                       capture_output=True)
        rows.append((f"Prefect flow, RayTaskRunner, {cpus} Ray worker(s)",
                     time.perf_counter() - t0))
    n = 2 * args.images
    print(f"\n{n} images in two sources; {os.cpu_count()} cores")
    print("| case | seconds | images/s | vs plain loop |")
    print("|---|---:|---:|---:|")
    for name, t in rows:
        print(f"| {name} | {t:.1f} | {n / t:.1f} | {t / plain - 1:+.0%} |")


if __name__ == "__main__":
    main()
