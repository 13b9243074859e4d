"""Speech synthesis: real-time factor and sentences/s per backend, the quality gate's cost per
question, and a first build against a cached rebuild.

    .venv/bin/python bench/bench_speech.py [--questions 400] [--reps 5] [--kokoro-reps 1]

1. espeak on English and Chinese questions: seconds of compute per second of audio (RTF) and
   sentences/s, in-process (no fork), as the build runs it (a helper process that forks a small
   image per utterance) and by a fork of this process per utterance (the build before).
2. coqui on a tiny random VITS (2 speakers, en + zh-cn, 22.05 kHz; tests/coqui/tiny_vits.py),
   in the same run: that part runs in the coqui venv (`make coqui-venv`) as a child process,
   because coqui-tts cannot load beside the main venv's CPU torch.
3. Kokoro-82M (int8 ONNX, `make kokoro-model`) on one onnxruntime thread, on the same
   sentences; and the paper's stage 2.2 projected in hours for 1, 32 and 256 workers from each
   backend's measured rate.
4. The quality gate per question on espeak audio, against the synthesis it guards: the signal
   checks alone, and with the ASR round trip on a tiny random Whisper (a real Whisper costs
   far more: the figure is the gate's own overhead, not a model's).
5. A build of N text-only QA records with speech questions on (half spoken), with an empty
   synthesis cache, against the same build again with the cache filled (in-process executor),
   with espeak and with the tiny VITS (the latter in the coqui venv).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "coqui"))

EN = ["What is the capital of France?", "How many legs does a spider have?",
      "Describe the colour of the sky at sunset.", "Why is the river important for the city?",
      "Where can I find a good library near the station?"]
ZH = ["法国的首都是哪里？", "蜘蛛有几条腿？", "请描述天空的颜色。", "河流有几条腿？"]
COQUI_PY = REPO / ".venv-coqui" / "bin" / "python"


def rate_rows(backend, label: str, fns: list[tuple[str, object]], reps: int) -> list[dict]:
    rows = []
    for lang, texts in (("en", EN), ("zh", ZH)):
        v = backend.voices(lang)[0]
        for mode, fn in fns:
            fn(texts[0], v)  # warm up
            t0, audio, n = time.perf_counter(), 0.0, 0
            for _ in range(reps):
                for t in texts:
                    audio += fn(t, v).size / backend.sample_rate
                    n += 1
            dt = time.perf_counter() - t0
            rows.append({"name": f"{label} {lang} ({v.id}), {mode}", "rtf": dt / audio,
                         "sps": n / dt, "audio_s": audio / n})
    return rows


def espeak_rows(reps: int) -> list[dict]:
    from transforms.tts import EspeakBackend

    b = EspeakBackend()
    here, fork = EspeakBackend(mode="inprocess"), EspeakBackend(mode="fork")
    return rate_rows(b, "espeak", [("in-process", here.synthesize),
                                   ("helper process (as built)", b.synthesize),
                                   ("fork of this process", fork.synthesize)], reps)


def kokoro_rows(reps: int, folder: Path) -> list[dict]:
    """Kokoro-82M int8 on one onnxruntime thread (as a build worker runs it), on the same
    sentences; its voice styles read English (en-us) and Mandarin (cmn) phonemes."""
    from transforms.tts import make_backend

    model, voices = folder / "kokoro-v1.0.int8.onnx", folder / "voices_ja.npz"
    if not model.exists():
        sys.exit(f"{model} is missing: run `make kokoro-model` first (the kokoro rows need it)")
    b = make_backend("kokoro", model_path=str(model), voices_path=str(voices), threads=1,
                     voices={"en": ["jf_alpha"], "zh": ["jf_alpha"]})
    return rate_rows(b, "kokoro-82M int8", [("in-process, 1 thread", b.synthesize)], reps)


PAPER_SENTENCES = 2_200_000  # stage 2.2 at the paper's size: half of 20% of ~22M QA questions


def coqui_rows(reps: int, questions: int) -> dict[str, list[dict]]:
    """Run in the coqui venv (the child process of `main`)."""
    import torch

    from transforms.tts import CoquiBackend

    from tiny_vits import make_tiny_vits

    with tempfile.TemporaryDirectory() as tmp:
        model, config = make_tiny_vits(Path(tmp) / "tiny-vits")
        t0 = time.perf_counter()
        b = CoquiBackend(model_path=str(model), config_path=str(config))
        load_s = time.perf_counter() - t0
        rows = rate_rows(b, "coqui tiny VITS", [("in-process", b.synthesize)], reps)
        for r in rows:
            r["note"] = (f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
                         f"model load {load_s:.1f} s")
        builds = build_rows(questions, "coqui tiny VITS", backend="coqui",
                            coqui_model_path=str(model), coqui_config_path=str(config))
    return {"rates": rows, "builds": builds}


def gate_rows(reps: int) -> list[dict]:
    from schemas.params import SpeechGateConfig
    from transforms.speech import Synthesizer
    from transforms.speech_gate import SpeechGate
    from transforms.tts import EspeakBackend

    from test_speech_gate import make_tiny_whisper

    synth = Synthesizer(EspeakBackend(), None)
    synth.speak("Warm up.", synth.backend.voices("en")[0], 16000)  # imports scipy's resampler
    items = []
    t0 = time.perf_counter()
    for lang, texts in (("en", EN), ("zh", ZH)):
        for t in texts:
            items.append((synth.speak(t, synth.backend.voices(lang)[0], 16000).wav, t, lang))
    synth_ms = 1000 * (time.perf_counter() - t0) / len(items)
    rows = [{"name": "espeak synthesis, forked + FLAC (the baseline)", "ms": synth_ms}]
    with tempfile.TemporaryDirectory() as tmp:
        whisper = make_tiny_whisper(Path(tmp) / "tiny-whisper")
        for name, cfg in (("gate: signal checks", SpeechGateConfig()),
                          ("gate: signal checks + ASR (tiny random Whisper)",
                           SpeechGateConfig(asr_check_path=str(whisper), asr_max_error=1e9))):
            gate = SpeechGate(cfg)
            wav, text, lang = items[0]
            gate.check(wav, 16000, text, lang)  # warm up (the first ASR call builds its caches)
            gate.checks, gate.seconds = 0, 0.0
            for _ in range(reps):
                for wav, t, lang in items:
                    gate.check(wav, 16000, t, lang)
            rows.append({"name": name, "ms": 1000 * gate.seconds / gate.checks})
    return rows


def build_rows(n: int, label: str = "espeak", **speech: object) -> list[dict]:
    from flows.build.pipeline import build
    from schemas.config import load_config

    from test_speech import qa_records, speech_corpus

    tmp = Path(tempfile.mkdtemp(prefix="vc-bench-"))
    cfg = load_config(speech_corpus(tmp / "in", qa_records(n), **speech))
    rows = []
    for name in ("first build (empty cache)", "rebuild (cache filled)"):
        if rows:
            shutil.rmtree(tmp / "out" / "ingest")
            shutil.rmtree(tmp / "out" / "rejects", ignore_errors=True)
        t0 = time.perf_counter()
        rep = build(cfg, str(tmp / "out"))
        sq = rep["sources"]["qa"]["speech_questions"]
        rows.append({"name": f"{label}: {name}", "s": time.perf_counter() - t0,
                     "calls": rep["tts"]["synthesis_calls"], "hits": rep["tts"]["cache_hits"],
                     "spoken": sq.get("spoken", 0),
                     "kept": ", ".join(f"{k[5:]} {v}" for k, v in sq.items() if k.startswith("kept:"))})
    shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=400)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--kokoro-dir", type=Path, default=REPO / ".models" / "kokoro")
    ap.add_argument("--kokoro-reps", type=int, default=1, help="repeats of the sentences for kokoro")
    ap.add_argument("--coqui-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.coqui_child:
        print(json.dumps(coqui_rows(args.reps, args.questions)))
        return
    if not COQUI_PY.exists():
        sys.exit(f"{COQUI_PY} is missing: run `make coqui-venv` first (the coqui rows run there)")
    rows = espeak_rows(args.reps)
    child = subprocess.run([str(COQUI_PY), __file__, "--coqui-child", "--reps", str(args.reps),
                            "--questions", str(args.questions)], capture_output=True, text=True)
    if child.returncode:
        sys.exit(f"the coqui part failed in {COQUI_PY}:\n{child.stderr[-3000:]}")
    coqui = json.loads(child.stdout.strip().splitlines()[-1])
    rows += coqui["rates"]
    rows += kokoro_rows(args.kokoro_reps, args.kokoro_dir)
    print("\n| backend, voice, mode | RTF (compute s / audio s) | sentences/s | audio s/sentence |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['rtf']:.4f} | {r['sps']:.1f} | {r['audio_s']:.2f} |")
    print(f"\nthe paper's stage 2.2 ({PAPER_SENTENCES:,} spoken questions), hours on N workers of "
          "one core each at these rates (English, as built)")
    print("| backend | 1 worker | 32 workers | 256 workers |")
    print("|---|---:|---:|---:|")
    for r in rows:
        if " en " in r["name"] and ("as built" in r["name"] or "espeak" not in r["name"]):
            h = PAPER_SENTENCES / r["sps"] / 3600
            print(f"| {r['name']} | {h:,.0f} | {h / 32:,.1f} | {h / 256:,.2f} |")
    notes = {r["note"] for r in rows if "note" in r}
    if notes:
        print(f"\ncoqui: {', '.join(sorted(notes))}")
    print(f"\nquality gate per question ({len(EN) + len(ZH)} espeak questions x {args.reps})")
    print("| step | ms per question |")
    print("|---|---:|")
    for r in gate_rows(args.reps):
        print(f"| {r['name']} | {r['ms']:.2f} |")
    print(f"\n{args.questions} QA records, speech questions on (fraction 0.5), gate on, "
          "in-process executor")
    print("| build | seconds | synthesis calls | cache hits | spoken | kept as text |")
    print("|---|---:|---:|---:|---:|---|")
    brows = build_rows(args.questions) + coqui["builds"]
    for r in brows:
        print(f"| {r['name']} | {r['s']:.2f} | {r['calls']} | {r['hits']} | {r['spoken']} | "
              f"{r['kept'] or '-'} |")
    for i in (0, 2):
        print(f"{brows[i]['name'].split(':')[0]} rebuild speed-up: "
              f"{brows[i]['s'] / brows[i + 1]['s']:.1f}x")


if __name__ == "__main__":
    main()
