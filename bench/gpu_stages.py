"""Every sub-stage trained on CUDA in bf16 from built shards, each starting from the previous
stage's run as `vita-corpus train --init` would, then stage 1.3 again with FSDP on the one GPU
and with packing. Part of bench/gpu_checks.sh (the device check); it runs anywhere with a GPU.

    python bench/gpu_stages.py OUT [--steps 5] [--batch-size 2] [--runs RUNS] [--device cuda]

OUT is a built corpus (`vita-corpus demo --out OUT`). The verdict gate is not imported here
(the device machine carries only the trainer's packages): the runs skip it and say so; the gate
itself is tested on the CPU. Prints a table and exits non-zero if any run fails, runs off the
asked device, or ends on a loss that is not finite.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from training.config import RunConfig  # noqa: E402
from training.loop import train  # noqa: E402
from training.stages import plan_for  # noqa: E402

STAGES = ("1.1", "1.2", "1.3", "2.1a", "2.1b", "2.2", "3.1", "3.2")


def one(out: Path, runs: Path, name: str, stage: str, init: Path | None, args: argparse.Namespace,
        **extra: object) -> dict:
    run = runs / name
    shutil.rmtree(run, ignore_errors=True)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    summary = train(out / f"stage_{stage}", run,
                    RunConfig(stage=stage, steps=args.steps, batch_size=args.batch_size,
                              device=args.device, lr=1e-4, **extra),
                    init=init, from_scratch=init is None, skip_validation=True)
    final = summary["final"]
    return {"run": name, "stage": stage, "device": summary["device"], "fsdp": summary["fsdp"],
            "steps": summary["steps"], "loss": final.get("loss", float("nan")),
            "tokens_per_s": final.get("tokens_per_s", float("nan")),
            "data_wait": summary["data_wait_frac"], "wall_s": time.perf_counter() - t0,
            "peak_mb": torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--runs", type=Path, default=Path("/tmp/vc-gpu-runs"))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--results", type=Path, default=None, help="write the rows to this JSON file")
    args = ap.parse_args()
    rows, failed = [], []
    done: dict[str, Path] = {}
    plan = [(s, s, {}) for s in STAGES]
    plan += [("1.3-fsdp", "1.3", {"fsdp": True}), ("1.3-pack", "1.3", {"pack": True})]
    for name, stage, extra in plan:
        previous = plan_for(stage).previous
        init = done.get(previous) if previous else None
        if previous and init is None:
            failed.append((name, f"stage {previous} did not train"))
            continue
        try:
            row = one(args.out, args.runs, name, stage, init, args, **extra)
        except Exception:  # noqa: BLE001 - every run is tried; the failure is printed whole
            failed.append((name, traceback.format_exc(limit=6)))
            continue
        rows.append(row)
        if name == stage:
            done[stage] = args.runs / name
        if not row["device"].startswith(args.device) or not math.isfinite(row["loss"]):
            failed.append((name, f"ran on {row['device']}, final loss {row['loss']}"))
        print(json.dumps(row), flush=True)
    print(f"\nevery stage, {args.steps} steps of {args.batch_size} samples, {args.device}"
          f"{' bf16 autocast' if args.device == 'cuda' else ''}, from {args.out}")
    print("| run | stage | FSDP | final loss | tokens/s | data wait | peak MB | wall s |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['run']} | {r['stage']} | {'yes' if r['fsdp'] else 'no'} | {r['loss']:.3f} "
              f"| {r['tokens_per_s']:,.0f} | {r['data_wait']:.1%} | {r['peak_mb']:,.0f} "
              f"| {r['wall_s']:.1f} |")
    if args.results:
        args.results.write_text(json.dumps({"rows": rows, "failed": failed}, indent=1) + "\n")
    for name, why in failed:
        print(f"FAILED {name}: {why}", file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
