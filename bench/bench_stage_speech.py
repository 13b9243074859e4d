"""Stage 2.2's speech on the workers: sentences/s on 1 and 2 Ray workers against the synthesis
floor, all in one run, on questions that all differ.

    .venv/bin/python bench/bench_stage_speech.py [--n 20000] [--part 500] [--workers 1,2]
                                                 [--fork-n 2000] [--root bench/out/stage_speech]

1. N text-only QA records, one question each, every question different (English, a fifth in
   Chinese; flows/corpora/scale.py's templates), ingested once (not timed here).
2. The floor: espeak-ng's library call alone, in this process, in a loop over the very
   (text, voice) pairs the stage speaks (no fork, no resampling, no cache, no gate, no shard).
   Beside it, the same loop through the helper process the build uses (transforms/
   espeak_helper.py), and through a fork of this process per utterance (what the build did
   before; this process holds what a worker holds), on the first --fork-n pairs.
3. The stage: a recipe of stage 2.2 taking every text record and speaking every question
   (speech_fraction 1.0) in parts of --part samples, built by `build_stage` on a fresh local
   Ray of 1, then 2 CPUs, each in a process of its own, each on a fresh copy of the ingest with
   an empty synthesis cache. Sentences/s = questions synthesized / the stage's wall time
   (Ray's start excluded; its workers' start and imports included).

4. CPU time per sentence, which a busy machine inflates far less than wall time, on --cpu-n
   sentences (their own corpus): the library call (this process's CPU), the helper alone (this
   process and the helper's process tree, counted when it exits), and the whole stage in this
   process (local executor: helper, resampling, FLAC, quality gate, reading and writing the
   shards). `--cpu-only` runs only this part.

With `--backend kokoro` the backend is Kokoro-82M int8 (`make kokoro-model`) on one
onnxruntime thread per worker, the floor its `synthesize` in a loop (use a small --n: about
1.3 s a sentence on one core).

With `--backend coqui` (run it with the coqui venv's python, `.venv-coqui/bin/python`), the
backend is the tiny random VITS of tests/coqui/tiny_vits.py on the CPU, the floor its
`synthesize` in a loop, and the helper and fork figures are left out. `--batch 1,4` (the
default) measures each speech.batch: the floor with B sentences a call (`synthesize_many` on
the stage's read-ahead of 32 samples), and the stage on each --workers count, each batch
setting on an ingest of its own (the speech settings are part of the ingest's fingerprint).

Prints a table and writes bench/out/stage_speech/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def make_corpus(root: Path, n: int, seed: int = 7, speech: dict | None = None
                ) -> tuple[Path, dict[str, str]]:
    from flows.corpora.scale import ZH_SHARE, _question

    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    questions = {}
    with open(root / "qa.jsonl", "w", encoding="utf-8") as f:
        for i in range(n):
            zh = rng.random() < ZH_SHARE
            q = _question(rng, zh, i)
            rid = f"q{i:07d}"
            questions[rid] = q
            f.write(json.dumps({"id": rid, "conversations": [
                {"from": "human", "value": q}, {"from": "gpt", "value": f"Answer {i}."}]},
                ensure_ascii=False) + "\n")
    cfg = {"name": f"stage-speech-{n}", "seed": 1234, "shard": {"max_samples": 1000},
           "sources": [{"name": "qa", "kind": "text", "format": "llava", "path": "qa.jsonl"}],
           **({"transforms": {"speech": speech}} if speech else {})}
    import yaml

    (root / "corpus.yaml").write_text(yaml.safe_dump(cfg))
    return root / "corpus.yaml", questions


def recipe(part: int):
    from schemas.recipes import StageRecipe

    return StageRecipe(stage="2.2", name="audio SFT, every question spoken", pools={"text": 1.0},
                       speech_fraction=1.0, trainable=["llm"], shard_max_samples=part)


def pairs_spoken(cfg, out: str, questions: dict[str, str], backend
                 ) -> list[tuple[str, object]]:
    """(text, voice) of every question the stage speaks, as it picks them."""
    from storage.parts import iter_manifests
    from transforms.speech import pick

    voices = {lang: backend.voices(lang) for lang in ("en", "zh")}
    out_pairs = []
    for m in iter_manifests(out, "ingest"):
        for s in m.samples:
            vs = voices.get(s.language) or []
            if vs:
                out_pairs.append((questions[s.id], pick(cfg.seed, s.id, 0, vs)))
    return out_pairs


def loop(fn, pairs) -> float:
    t0 = time.perf_counter()
    for text, voice in pairs:
        fn(text, voice)
    return time.perf_counter() - t0


def child(cfg_path: str, out: str, workers: int, part: int) -> None:
    """One stage build on a fresh local Ray of `workers` CPUs; prints its figures as JSON."""
    from flows.build.pipeline import prepare
    from flows.build.ray_exec import RayDataExecutor
    from flows.build.stages import build_stage
    from schemas.config import load_config

    r = recipe(part)
    cfg = prepare(load_config(cfg_path), out, stages=[r])
    ex = RayDataExecutor(num_cpus=workers)
    c0, t0 = time.process_time(), time.perf_counter()
    summary = build_stage(cfg, out, r, executor=ex)
    wall = time.perf_counter() - t0
    print("RESULT " + json.dumps({"workers": workers, "wall_s": wall,
                                  "driver_cpu_s": time.process_time() - c0,
                                  "samples": summary["pools"]["text"]["selected"],
                                  "tts": summary["tts"], "speech": summary["speech"],
                                  "partitions": summary["partitions"],
                                  # the workers' own CPU (espeak-ng's helper not included)
                                  "worker_cpu_s": summary["partitions"].get("cpu_s", 0.0)}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--part", type=int, default=500)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--fork-n", type=int, default=2000)
    ap.add_argument("--root", default=str(REPO / "bench" / "out" / "stage_speech"))
    ap.add_argument("--backend", default="espeak", choices=["espeak", "coqui", "kokoro"])
    ap.add_argument("--kokoro-dir", type=Path, default=REPO / ".models" / "kokoro")
    ap.add_argument("--batch", default="1,4", help="coqui: speech.batch values to measure")
    ap.add_argument("--cpu-n", type=int, default=2000)
    ap.add_argument("--cpu-only", action="store_true")
    ap.add_argument("--child", nargs=4, metavar=("CONFIG", "OUT", "WORKERS", "PART"))
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]), int(args.child[3]))
        return
    from flows.build.pipeline import ingest, prepare
    from schemas.config import load_config
    from transforms.tts import EspeakBackend

    root = Path(args.root)
    shutil.rmtree(root, ignore_errors=True)
    if args.backend == "espeak":
        cpu = cpu_rows(root / "cpu", args.cpu_n, args.part)
        print("CPU ms a sentence: " + json.dumps(cpu), flush=True)
        if args.cpu_only:
            (root / "results.json").write_text(json.dumps({"cpu": cpu}, indent=1))
            return
    t0 = time.perf_counter()
    speech = None
    if args.backend == "coqui":
        sys.path.insert(0, str(REPO / "tests" / "coqui"))
        from transforms.tts import CoquiBackend

        from tiny_vits import make_tiny_vits

        model, config = make_tiny_vits(root / "tiny-vits")
        speech = {"backend": "coqui", "coqui_model_path": str(model),
                  "coqui_config_path": str(config), "device": "cpu"}
        here = CoquiBackend(model_path=str(model), config_path=str(config))
    elif args.backend == "kokoro":
        from transforms.kokoro import KokoroBackend

        model = args.kokoro_dir / "kokoro-v1.0.int8.onnx"
        if not model.exists():
            sys.exit(f"{model} is missing: run `make kokoro-model` first")
        # The voices file holds Japanese styles; they read English (en-us) and Mandarin (cmn)
        # phonemes, which is what the cost depends on.
        speech = {"backend": "kokoro", "kokoro_model_path": str(model),
                  "kokoro_voices_path": str(args.kokoro_dir / "voices_ja.npz"), "device": "cpu",
                  "voices": {"en": ["jf_alpha", "jm_kumo"], "zh": ["jf_alpha"]}}
        here = KokoroBackend(speech["kokoro_model_path"], speech["kokoro_voices_path"],
                             voices=speech["voices"], device="cpu")
    else:
        here = EspeakBackend(mode="inprocess")
    cfg_path, questions = make_corpus(root / "in", args.n, speech=speech)
    base = root / "base"
    cfg = prepare(load_config(cfg_path), str(base), stages=[recipe(args.part)])
    ingest(cfg, str(base))
    print(f"{args.n} records generated and ingested in {time.perf_counter() - t0:.0f} s",
          flush=True)
    pairs = pairs_spoken(cfg, str(base), questions, here)
    rows = {"n": args.n, "backend": args.backend, "sentences": len(pairs),
            "uptime": os.getloadavg()}
    here.synthesize("Warm up.", pairs[0][1])
    rows["floor_s"] = loop(here.synthesize, pairs)
    print(f"floor: {len(pairs)} sentences in {rows['floor_s']:.1f} s "
          f"({len(pairs) / rows['floor_s']:.1f}/s)", flush=True)
    neural = args.backend in ("coqui", "kokoro")
    batches = [int(b) for b in args.batch.split(",")] if args.backend == "coqui" else [1]
    for b in batches if neural else []:
        cfg_b, base_b = cfg_path, base
        if b != 1:
            from flows.build.stage_parts import SPEECH_AHEAD

            batched = CoquiBackend(model_path=speech["coqui_model_path"],
                                   config_path=speech["coqui_config_path"], batch=b)
            list(batched.synthesize_many(pairs[:2]))
            t1 = time.perf_counter()
            for i in range(0, len(pairs), SPEECH_AHEAD):
                list(batched.synthesize_many(pairs[i:i + SPEECH_AHEAD]))
            rows.setdefault("floor_batched_s", {})[b] = time.perf_counter() - t1
            print(f"floor, {b} sentences a call: {len(pairs)} sentences in "
                  f"{rows['floor_batched_s'][b]:.1f} s "
                  f"({len(pairs) / rows['floor_batched_s'][b]:.1f}/s)", flush=True)
            cfg_b = cfg_path.with_name(f"corpus-batch{b}.yaml")
            import yaml

            doc = yaml.safe_load(cfg_path.read_text())
            doc["transforms"]["speech"]["batch"] = b
            cfg_b.write_text(yaml.safe_dump(doc))
            base_b = root / f"base-batch{b}"
            ingest(prepare(load_config(cfg_b), str(base_b), stages=[recipe(args.part)]),
                   str(base_b))
        for k in [int(w) for w in args.workers.split(",")]:
            res = run_stage(cfg_b, root, base_b, k, args.part)
            res["batch"] = b
            rows.setdefault("stage", []).append(res)
    if neural:
        finish(rows, root, pairs)
        return
    helper = EspeakBackend()
    helper.synthesize("Warm up.", pairs[0][1])
    rows["helper_s"] = loop(helper.synthesize, pairs)
    helper.close()
    print(f"helper alone: {len(pairs) / rows['helper_s']:.1f}/s", flush=True)
    forked = EspeakBackend(mode="fork")
    sub = pairs[:args.fork_n]
    rows["fork_n"] = len(sub)
    rows["fork_s"] = loop(forked.synthesize, sub)
    rows["floor_sub_s"] = loop(here.synthesize, sub)
    rows["helper_sub_s"] = loop(EspeakBackend().synthesize, sub)
    import resource

    rows["this_process_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"on {len(sub)} sentences: library {len(sub) / rows['floor_sub_s']:.1f}/s, helper "
          f"{len(sub) / rows['helper_sub_s']:.1f}/s, fork of this process "
          f"{len(sub) / rows['fork_s']:.1f}/s", flush=True)
    rows["stage"] = [run_stage(cfg_path, root, base, int(k), args.part)
                     for k in args.workers.split(",")]
    finish(rows, root, pairs)


def cpu_rows(root: Path, n: int, part: int) -> dict:
    """CPU milliseconds a sentence: the library, the helper, the whole stage in one process."""
    import resource

    from flows.build import stage_parts
    from flows.build.pipeline import ingest, prepare
    from flows.build.stages import build_stage
    from schemas.config import load_config
    from transforms.tts import EspeakBackend

    def children() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    cfg_path, questions = make_corpus(root / "in", n, seed=11)
    base = root / "base"
    cfg = prepare(load_config(cfg_path), str(base), stages=[recipe(part)])
    ingest(cfg, str(base))
    here = EspeakBackend(mode="inprocess")
    pairs = pairs_spoken(cfg, str(base), questions, here)
    here.synthesize("Warm up.", pairs[0][1])
    c0 = time.process_time()
    loop(here.synthesize, pairs)
    rows = {"sentences": len(pairs), "library": (time.process_time() - c0) / len(pairs) * 1e3}
    c0, k0 = time.process_time(), children()
    helper = EspeakBackend()
    loop(helper.synthesize, pairs)
    helper.close()
    rows["helper"] = (time.process_time() - c0 + children() - k0) / len(pairs) * 1e3
    c0, k0 = time.process_time(), children()
    summary = build_stage(cfg, str(base), recipe(part))
    for synth in stage_parts._SYNTHS.values():
        synth.backend.close()
    spoken = summary["tts"]["synthesis_calls"]
    rows["stage"] = (time.process_time() - c0 + children() - k0) / spoken * 1e3
    rows["stage_sentences"] = spoken
    return rows


def run_stage(cfg_path: Path, root: Path, base: Path, k: int, part: int) -> dict:
    """Stage 2.2 built on a fresh Ray of `k` CPUs in a process of its own, on a fresh copy of
    the ingest (an empty synthesis cache)."""
    out = root / f"out-{k}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(base, out)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, __file__, "--child", str(cfg_path), str(out), str(k),
                           str(part)], env=env, capture_output=True, text=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        raise SystemExit(f"stage build on {k} workers failed:\n{proc.stderr[-3000:]}")
    res = json.loads(line[0][7:])
    res["sentences_per_s"] = res["tts"]["synthesis_calls"] / res["wall_s"]
    if res.get("worker_cpu_s") and res["tts"]["synthesis_calls"]:
        res["worker_cpu_ms"] = res["worker_cpu_s"] / res["tts"]["synthesis_calls"] * 1e3
    print(f"stage 2.2 on {k} worker(s): {res['tts']['synthesis_calls']} synthesized in "
          f"{res['wall_s']:.1f} s = {res['sentences_per_s']:.1f}/s; driver CPU "
          f"{res['driver_cpu_s']:.1f} s", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    return res


def finish(rows: dict, root: Path, pairs: list) -> None:
    floor_rate = len(pairs) / rows["floor_s"]
    for res in rows["stage"]:
        res["of_floor"] = res["sentences_per_s"] / floor_rate
    if len(rows["stage"]) >= 2:
        rows["speedup"] = rows["stage"][1]["sentences_per_s"] / rows["stage"][0]["sentences_per_s"]
    rows["uptime_after"] = os.getloadavg()
    (root / "results.json").write_text(json.dumps(rows, indent=1, default=str))
    print(json.dumps({k: v for k, v in rows.items() if k != "stage"}, default=str))
    for res in rows["stage"]:
        batch = f", batch {res['batch']}" if "batch" in res else ""
        print(f"{res['workers']} worker(s){batch}: {res['sentences_per_s']:.1f} sentences/s, "
              f"{res['of_floor']:.0%} of the floor, worker CPU "
              f"{res.get('worker_cpu_ms', float('nan')):.1f} ms a sentence", flush=True)


if __name__ == "__main__":
    main()
