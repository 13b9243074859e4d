"""Speech synthesis: real-time factor and sentences/s per backend; first build vs cached rebuild.

    .venv/bin/python bench/bench_speech.py [--questions 400]

1. The espeak backend on English and Chinese questions: seconds of compute per second of
   audio (RTF) and sentences/s, in-process (no fork) and as the build runs it (a fork per
   utterance, for determinism).
2. A build of N text-only QA records with speech questions on (half spoken), with an empty
   synthesis cache, against the same build again with the cache filled (in-process executor).
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

from flows.build import build  # noqa: E402
from schemas.config import load_config  # noqa: E402
from transforms.tts import EspeakBackend  # noqa: E402

from test_speech import qa_records, speech_corpus  # noqa: E402

EN = ["What is the capital of France?", "How many legs does a spider have?",
      "Describe the colour of the sky at sunset.", "Why is the river important for the city?",
      "Where can I find a good library near the station?"]
ZH = ["法国的首都是哪里？", "蜘蛛有几条腿？", "请描述日落时天空的颜色。", "这条河对城市为什么重要？"]


def synth_rows(reps: int) -> list[tuple[str, float, float]]:
    b = EspeakBackend()
    rows = []
    for lang, texts in (("en", EN), ("zh", ZH)):
        v = b.voices(lang)[0]
        for mode, fn in (("in-process", b._synthesize_here), ("forked (as built)", b.synthesize)):
            fn(texts[0], v)
            t0, audio, n = time.perf_counter(), 0.0, 0
            for _ in range(reps):
                for t in texts:
                    audio += fn(t, v).size / b.sample_rate
                    n += 1
            dt = time.perf_counter() - t0
            rows.append((f"espeak {lang} ({v.id}), {mode}", dt / audio, n / dt))
    return rows


def build_rows(n: int) -> list[tuple[str, float, int, int]]:
    tmp = Path(tempfile.mkdtemp(prefix="vc-bench-"))
    cfg = load_config(speech_corpus(tmp / "in", qa_records(n)))
    rows = []
    t0 = time.perf_counter()
    first = build(cfg, str(tmp / "out"))
    rows.append(("first build (empty cache)", time.perf_counter() - t0,
                 first["tts"]["synthesis_calls"], first["tts"]["cache_hits"]))
    shutil.rmtree(tmp / "out" / "ingest")
    shutil.rmtree(tmp / "out" / "rejects", ignore_errors=True)
    t0 = time.perf_counter()
    again = build(cfg, str(tmp / "out"))
    rows.append(("rebuild (cache filled)", time.perf_counter() - t0,
                 again["tts"]["synthesis_calls"], again["tts"]["cache_hits"]))
    shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=400)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    print("\n| backend, voice, mode | RTF (compute s / audio s) | sentences/s |")
    print("|---|---:|---:|")
    for name, rtf, sps in synth_rows(args.reps):
        print(f"| {name} | {rtf:.4f} | {sps:.1f} |")
    print(f"\n{args.questions} QA records, speech questions on (fraction 0.5), in-process executor")
    print("| build | seconds | synthesis calls | cache hits |")
    print("|---|---:|---:|---:|")
    rows = build_rows(args.questions)
    for name, secs, calls, hits in rows:
        print(f"| {name} | {secs:.2f} | {calls} | {hits} |")
    print(f"\nrebuild speed-up: {rows[0][1] / rows[1][1]:.1f}x")


if __name__ == "__main__":
    main()
