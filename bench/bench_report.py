"""Data-mix report generation over 1 million synthetic manifest rows.

    .venv/bin/python bench/bench_report.py [--rows 1000000] [--per-shard 1000]

Writes synthetic manifests (as a build would: one per shard, one row per sample) into a temp
OUT/ingest, then times the report (aggregate + JSON + HTML) against a baseline in the same
run that loads every manifest through the validated pydantic model first.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flows.report.mix import write_report  # noqa: E402
from schemas.manifest import ShardManifest  # noqa: E402
from storage.parts import list_manifests  # noqa: E402


def synth(out: Path, rows: int, per: int) -> None:
    rnd = random.Random(0)
    stage = out / "ingest"
    stage.mkdir(parents=True)
    tasks = ["caption", "qa", "ocr", "video", "text", "asr"]
    for part in range(rows // per):
        src = f"src{part % 6}"
        task = tasks[part % 6]
        samples = []
        for i in range(per):
            idx = part * per + i
            s = {"id": f"r{idx}", "key": f"{src}-r{idx}", "index": idx,
                 "members": ["json", "tile_00.jpg"], "bytes": 150_000, "task": task,
                 "language": "en" if rnd.random() < 0.8 else "zh",
                 "tokens": rnd.randint(100, 3500), "tiles": [], "frames": 0, "audio_s": [],
                 "speech": None}
            if task in ("caption", "qa", "ocr"):
                s["tiles"] = [rnd.choice([1, 3, 5, 7, 9, 13])]
            elif task == "video":
                s["frames"] = rnd.choice([4, 8, 12, 16])
            elif task == "asr":
                s["audio_s"] = [round(rnd.uniform(0.5, 30), 2)]
            samples.append(s)
        m = {"stage": "ingest", "source": src, "part": part, "shard": f"{src}-{part:05d}.tar",
             "count": per, "bytes": per * 150_000, "sha256": "0" * 64, "input_start": part * per,
             "input_end": (part + 1) * per, "input_sha256": "0" * 64, "rejected": 0,
             "reject_reasons": {}, "rejects_file": None, "member_counts": {"json": per},
             "config_fingerprint": "x", "code_version": "bench", "samples": samples}
        (stage / f"{src}-{part:05d}.manifest.json").write_text(json.dumps(m))


def baseline(out: Path) -> int:
    """Validate every manifest into models, then count: what a quick script would do."""
    c = Counter()
    for m in list_manifests(str(out), "ingest"):
        assert isinstance(m, ShardManifest)
        for s in m.samples:
            c[s.task] += 1
            c["tokens"] += s.tokens
    return c["tokens"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--per-shard", type=int, default=1000)
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="vc-report-"))
    try:
        t0 = time.perf_counter()
        synth(out, args.rows, args.per_shard)
        print(f"wrote {args.rows:,} rows in {args.rows // args.per_shard} manifests "
              f"({sum(p.stat().st_size for p in (out / 'ingest').iterdir()) / 2**20:.0f} MB) "
              f"in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        rep = write_report(str(out))
        ours = time.perf_counter() - t0
        assert rep["stages"]["ingest"]["samples"] == args.rows
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t0 = time.perf_counter()
        baseline(out)
        base = time.perf_counter() - t0
        print("\n| case | seconds | rows/s |")
        print("|---|---:|---:|")
        print(f"| baseline: load manifests as pydantic models, count | {base:.1f} | "
              f"{args.rows / base:,.0f} |")
        print(f"| vita-corpus report (aggregate + data_mix.json + index.html) | {ours:.1f} | "
              f"{args.rows / ours:,.0f} |")
        print(f"\npeak RSS of the report (before the baseline ran): {peak:.0f} MB; "
              f"HTML {(out / 'report' / 'index.html').stat().st_size / 1024:.0f} kB")
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
