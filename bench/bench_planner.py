"""The driver's share of the content checks: the planner alone, no workers, on the scale corpus
with planted duplicates, in CPU seconds of this process (which a busy machine inflates far less
than wall time).

    PYTHONPATH=. .venv/bin/python bench/bench_planner.py [--sizes 20000,100000]
                                                         [--root bench/out/planner]

For each N: `make_scale_inputs(plant=True)`, then every source's `SourcePlanner.partitions`
read to the end, as the build's driver reads them, into a fresh OUT: once with the content
checks off (light planning, as a build without them plans), once with the corpus's checks
(exact, near text, a benchmark: the parsed records, their media hashed, every decision made
and indexed in OUT/state/ingest/content.sqlite). Prints CPU us per input of each, and the
index's size on disk.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def plan_all(cfg_path: Path, out: Path) -> dict:
    from flows.build.content import open_decider
    from flows.build.plan import SourcePlanner
    from schemas.config import load_config

    cfg = load_config(cfg_path)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0, c0 = time.time(), time.process_time()
    decider = open_decider(cfg, str(out), "ingest")
    inputs = 0
    for src in cfg.sources:
        planner = SourcePlanner(cfg, src, str(out), "ingest", False, content=decider)
        for _ in planner.partitions():
            pass
        inputs += planner.inputs_read
    if decider is not None:
        decider.close()
    cpu = time.process_time() - c0
    db = out / "state" / "ingest" / "content.sqlite"
    return {"inputs": inputs, "cpu_s": round(cpu, 2), "wall_s": round(time.time() - t0, 2),
            "cpu_us_per_input": round(1e6 * cpu / max(inputs, 1), 1),
            "index_mb": round(db.stat().st_size / 2**20, 1) if db.exists() else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="20000,100000")
    ap.add_argument("--root", default=str(ROOT / "bench" / "out" / "planner"))
    args = ap.parse_args()
    from bench_dedupe import off_config

    from flows.corpora.scale import make_scale_inputs

    root = Path(args.root)
    results = {}
    for n in [int(x) for x in args.sizes.split(",") if x]:
        nroot = root / f"n{n}"
        cfg = make_scale_inputs(nroot / "inputs", n, plant=True)
        results[n] = {"off": plan_all(off_config(cfg), nroot / "out_off"),
                      "on": plan_all(cfg, nroot / "out_on")}
        print(json.dumps({n: results[n]}), flush=True)
        shutil.rmtree(nroot, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    (root / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
