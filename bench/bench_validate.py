"""Validation throughput (samples/s) and its cost as a fraction of the build.

    .venv/bin/python bench/bench_validate.py [--captions 300] [--qa 2000]

Builds a corpus of small captioned images and text QA with every default stage (in-process
executor), then validates every stage (reading the tars, Great Expectations suites, Data Docs).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from flows.build.pipeline import build  # noqa: E402
from flows.validation.gate import validate  # noqa: E402
from schemas.config import load_config  # noqa: E402
from schemas.recipes import DEFAULT_RECIPES  # noqa: E402

from test_stages_report import mixed_corpus  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--captions", type=int, default=300)
    ap.add_argument("--qa", type=int, default=2000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="vc-val-"))
    try:
        cfg = load_config(mixed_corpus(tmp / "in", args.captions, args.qa))
        t0 = time.perf_counter()
        build(cfg, str(tmp / "out"), stages=DEFAULT_RECIPES)
        t_build = time.perf_counter() - t0
        t0 = time.perf_counter()
        verdicts = validate(str(tmp / "out"))
        t_val = time.perf_counter() - t0
        n = sum(v["samples"] for v in verdicts.values())
        assert all(v["passed"] for v in verdicts.values())
        print(f"\n{args.captions} captions + {args.qa} QA records, {len(verdicts)} stages, "
              f"{n} stage samples validated")
        print("| step | seconds | samples/s |")
        print("|---|---:|---:|")
        print(f"| build (ingest + stages + report) | {t_build:.1f} | - |")
        print(f"| validate every stage | {t_val:.1f} | {n / t_val:.0f} |")
        print(f"\nvalidation / build: {t_val / t_build:.0%}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
