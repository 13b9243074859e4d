"""How validation's cost grows with a stage: streamed in chunks against the whole stage in one table.

    .venv/bin/python bench/bench_validate_scale.py [--sizes 20000,100000,400000] [--chunk 50000]

Writes a stage of N text-QA samples straight through the part writer (the build's own shard
format and manifests, no transforms: this measures the gate, not the ingest), then validates it
in a fresh process twice: with the default chunks (sample rows checked 50,000 at a time, ids
through the on-disk index) and, as the baseline, with one chunk holding every row (what the gate
did before: one pandas table per stage). Peak RSS is the child process's maximum resident set.
Two duplicate ids are planted, one across chunks, and must be found by both.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_stage(out: Path, n: int, per_shard: int = 1000) -> None:
    from schemas.config import CorpusConfig, dump_config
    from storage.parts import PartWriter

    cfg = CorpusConfig.model_validate({"name": "bench", "sources": [
        {"name": "qa", "kind": "text", "format": "llava", "path": "x.json"}]})
    out.mkdir(parents=True)
    (out / "corpus.yaml").write_text(dump_config(cfg))
    stage = "stage_1.3"
    w, part = None, 0
    for i in range(n):
        if w is None:
            w = PartWriter(str(out), stage, "qa", part, i, "bench")
        rid = f"q{i:08d}"
        if i in (n // 3, n - 1):  # planted duplicates: one early, one far across chunks
            rid = "q00000001"
        rec = {"id": rid, "set": "qa", "conversations": [
            {"from": "human", "value": f"What is {i} plus {i}?"},
            {"from": "gpt", "value": f"It is {2 * i}."}],
            "meta": {"task": "text", "source": "qa", "lineage": f"x.json:{i}", "language": "en",
                     "members": {}, "tokens": {"text": 12, "total": 12}}}
        w.add_input(i, rid)
        w.add_sample(f"qa-{i:08d}", rid, i, [("json", json.dumps(rec).encode())],
                     language="en", task="text", tokens=12)
        if len(w.samples) >= per_shard:
            w.commit()
            w, part = None, part + 1
    if w is not None:
        w.commit()


def child(out: str, chunk: int) -> None:
    from flows.validation.gate import validate_stage

    t0 = time.perf_counter()
    v = validate_stage(out, "stage_1.3", chunk_rows=chunk)
    dt = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": dt, "rss_mb": rss, "scanned": v["samples_scanned"],
                      "removed": v["removed_samples"]["by_reason"], "chunks": v["chunks"]}))


def run(out: Path, chunk: int) -> dict:
    # Each run on a fresh copy: the first removes the planted duplicates from the shards.
    work = out.parent / f"{out.name}-{chunk}"
    shutil.copytree(out, work)
    try:
        res = subprocess.run([sys.executable, __file__, "--child", str(work), "--chunk", str(chunk)],
                             capture_output=True, text=True, check=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="20000,100000,400000")
    ap.add_argument("--chunk", type=int, default=50_000)
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.chunk)
        return
    tmp = Path(tempfile.mkdtemp(prefix="vc-valscale-"))
    print("| samples | mode | chunks | seconds | samples/s | peak RSS MB |")
    print("|---:|---|---:|---:|---:|---:|")
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            out = tmp / f"n{n}"
            make_stage(out, n)
            for mode, chunk in (("one table (baseline)", n + 10), ("chunks", args.chunk)):
                r = run(out, chunk)
                assert r["removed"] == {"duplicate_id": 2}, r
                print(f"| {n} | {mode} | {r['chunks']} | {r['seconds']:.1f} | "
                      f"{n / r['seconds']:.0f} | {r['rss_mb']:.0f} |", flush=True)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
