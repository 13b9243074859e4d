"""Stages on the workers: planned as parts, each written by whichever worker runs it.

The same stage bytes from the local executor and from 1 and 2 Ray workers; a stage killed
part-way and built again loses and duplicates nothing; the synthesis cache takes several
writers of one entry; espeak-ng's audio does not depend on what its worker spoke before.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from flows.build.pipeline import ingest, prepare
from flows.build.stages import StagePlanner, build_stage
from schemas.config import load_config
from schemas.recipes import DEFAULT_RECIPES, write_recipes
from storage.parts import iter_manifests

from conftest import CLI, REPO, env_for, tars, temp_leftovers
from test_stages_report import mixed_corpus

# 1.3 copies (no speech), 2.2 speaks; small parts, so that each source has several.
STAGES = [r.model_copy(update={"shard_max_samples": 17 if r.stage == "1.3" else 8})
          for r in DEFAULT_RECIPES if r.stage in ("1.3", "2.2")]


def manifests(out: Path, stage: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / stage).glob("*.manifest.json"))}


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> tuple[Path, Path]:
    """A mixed corpus (captions and QA) ingested once, its stages not built yet."""
    root = tmp_path_factory.mktemp("parts")
    cfg_path = mixed_corpus(root / "in", n_caption=40, n_qa=160)
    cfg = prepare(load_config(cfg_path), str(root / "base"), stages=STAGES)
    ingest(cfg, str(root / "base"))
    return cfg_path, root / "base"


def _copy(base: Path, to: Path) -> Path:
    shutil.copytree(base, to)
    return to


def _built_locally(cfg_path: Path, base: Path, tmp_path: Path) -> tuple[Path, dict]:
    cfg = prepare(load_config(cfg_path), str(base), stages=STAGES)
    local = _copy(base, tmp_path / "local")
    return local, {r.stage: build_stage(cfg, str(local), r) for r in STAGES}


def test_stage_parts_are_the_same_bytes_locally_and_on_two_ray_workers(ingested, tmp_path,
                                                                       ray_executor):
    cfg_path, base = ingested
    local, summaries = _built_locally(cfg_path, base, tmp_path)
    cfg = prepare(load_config(cfg_path), str(base), stages=STAGES)
    two = _copy(base, tmp_path / "two")
    on_ray = {r.stage: build_stage(cfg, str(two), r, executor=ray_executor) for r in STAGES}
    for r in STAGES:
        parts = summaries[r.stage]["partitions"]["written"]
        assert parts >= 4 and on_ray[r.stage]["partitions"]["written"] == parts
        assert len(tars(local, r.dirname)) == parts
        assert tars(two, r.dirname) == tars(local, r.dirname), r.stage
        assert manifests(two, r.dirname) == manifests(local, r.dirname)
        assert on_ray[r.stage]["pools"] == summaries[r.stage]["pools"]
    # Stage 2.2 spoke on the workers, each question synthesized or found in the cache.
    spoken = summaries["2.2"]["speech"]["spoken"]
    assert spoken > 5 and on_ray["2.2"]["speech"] == summaries["2.2"]["speech"]
    local_tts, ray_tts = summaries["2.2"]["tts"], on_ray["2.2"]["tts"]
    assert local_tts["synthesis_calls"] >= spoken
    assert sum(ray_tts.values()) == sum(local_tts.values())


@pytest.mark.slow
def test_stage_parts_are_the_same_bytes_on_one_ray_worker(ingested, tmp_path):
    """The command line in a process of its own, on a Ray of 1 CPU."""
    cfg_path, base = ingested
    local, summaries = _built_locally(cfg_path, base, tmp_path)
    one = _copy(base, tmp_path / "one")
    write_recipes(tmp_path / "recipes", STAGES)
    proc = subprocess.run([CLI, "build", "-c", str(cfg_path), "-o", str(one), "--num-cpus", "1",
                           "--recipes", str(tmp_path / "recipes"), "--stages", "1.3,2.2",
                           "--no-validate", "--quiet"],
                          env=env_for(tmp_path), cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((one / "report" / "build_report.json").read_text())
    for r in STAGES:
        assert report["stages"][r.stage]["partitions"]["written"] == \
            summaries[r.stage]["partitions"]["written"] >= 4
        assert tars(one, r.dirname) == tars(local, r.dirname), r.stage
        assert manifests(one, r.dirname) == manifests(local, r.dirname)


KILLER = textwrap.dedent("""
    import os, signal, sys
    from schemas.config import load_config
    from schemas.recipes import StageRecipe
    from flows.build.pipeline import prepare
    from flows.build.stages import build_stage
    import storage.parts as parts

    cfg_path, out, recipe_json, after = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    recipe = StageRecipe.model_validate_json(recipe_json)
    cfg = prepare(load_config(cfg_path), out, stages=[recipe])
    add, seen = parts.PartWriter.add_sample, [0]

    def add_then_die(self, *args, **kwargs):
        add(self, *args, **kwargs)
        seen[0] += 1
        if seen[0] == after:  # in the middle of a part: its tar is half written
            os.kill(os.getpid(), signal.SIGKILL)

    parts.PartWriter.add_sample = add_then_die
    build_stage(cfg, out, recipe)
""")


def test_a_stage_killed_part_way_is_finished_by_a_rerun_losing_and_duplicating_nothing(
        ingested, tmp_path):
    cfg_path, base = ingested
    recipe = STAGES[0]  # 1.3: 200 samples in parts of 17
    cfg = prepare(load_config(cfg_path), str(base), stages=STAGES)
    clean = _copy(base, tmp_path / "clean")
    whole = build_stage(cfg, str(clean), recipe)
    killed = _copy(base, tmp_path / "killed")
    after = 3 * 17 + 5  # samples added when the process is killed
    ends = np.cumsum([m.count for m in iter_manifests(str(clean), recipe.dirname)])
    committed = int(np.sum(ends < after))  # parts whose manifest was written before the kill
    assert 2 <= committed < len(ends) - 1
    proc = subprocess.run([sys.executable, "-c", KILLER, str(cfg_path), str(killed),
                           recipe.model_dump_json(), str(after)],
                          env=env_for(tmp_path), cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert temp_leftovers(killed)  # the part under way was cut short
    assert not (killed / recipe.dirname / "_stage.json").exists()  # not complete
    assert len(list(iter_manifests(str(killed), recipe.dirname))) == committed
    again = build_stage(cfg, str(killed), recipe)
    assert again["partitions"]["kept"] == committed
    assert again["partitions"]["written"] == whole["partitions"]["written"] - committed
    assert again["pools"] == whole["pools"]
    assert tars(killed, recipe.dirname) == tars(clean, recipe.dirname)
    assert manifests(killed, recipe.dirname) == manifests(clean, recipe.dirname)
    assert not temp_leftovers(killed)
    keys = [s.key for m in iter_manifests(str(killed), recipe.dirname) for s in m.samples]
    assert len(keys) == len(set(keys)) == sum(p["selected"] for p in whole["pools"].values())
    # Built once more, the stage is kept whole.
    assert build_stage(cfg, str(killed), recipe)["reused"] is True


def test_a_part_changed_on_disk_is_written_again_and_the_rest_kept(ingested, tmp_path):
    cfg_path, base = ingested
    recipe = STAGES[0]
    cfg = prepare(load_config(cfg_path), str(base), stages=STAGES)
    out = _copy(base, tmp_path / "out")
    build_stage(cfg, str(out), recipe)
    before = tars(out, recipe.dirname)
    victim = sorted((out / recipe.dirname).glob("*.tar"))[1]
    victim.write_bytes(victim.read_bytes()[:-1024])
    planner = StagePlanner(cfg, str(out), recipe)
    todo = [p.name for p in planner.partitions()]
    assert todo == [victim.name.removesuffix(".tar")]
    again = build_stage(cfg, str(out), recipe)
    assert again["partitions"]["written"] == 1 and again["partitions"]["kept"] == len(before) - 1
    assert tars(out, recipe.dirname) == before


def _speak_into(cache: str, text: str, start, done) -> None:  # noqa: ANN001
    from transforms.speech import Synthesizer
    from transforms.tts import EspeakBackend

    synth = Synthesizer(EspeakBackend(), cache)
    voice = synth.backend.voices("en")[0]
    start.wait()
    speech = synth.speak(text, voice, 16000)
    done.put((synth.calls, speech.flac))


def test_several_workers_writing_one_cache_entry_leave_one_good_entry(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    n = 4
    start, done = ctx.Barrier(n), ctx.Queue()
    text = "Four workers speak this sentence into one cache entry at once."
    procs = [ctx.Process(target=_speak_into, args=(str(tmp_path / "cache"), text, start, done))
             for _ in range(n)]
    for p in procs:
        p.start()
    got = [done.get(timeout=120) for _ in range(n)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    entries = list((tmp_path / "cache").rglob("*"))
    files = [e for e in entries if e.is_file()]
    assert len(files) == 1 and not temp_leftovers(tmp_path)
    wav, rate = sf.read(files[0], dtype="float32")
    assert rate == 16000 and wav.size > 8000
    assert all(flac == files[0].read_bytes() for _, flac in got)
    # A damaged entry (a copy cut short) is spoken again and replaced, not served.
    good = files[0].read_bytes()
    files[0].write_bytes(good[:100])
    from transforms.speech import Synthesizer
    from transforms.tts import EspeakBackend

    synth = Synthesizer(EspeakBackend(), str(tmp_path / "cache"))
    speech = synth.speak(text, synth.backend.voices("en")[0], 16000)
    assert synth.calls == 1 and speech.flac == good == files[0].read_bytes()


def test_espeak_audio_is_the_same_whatever_the_worker_spoke_before():
    from transforms.tts import EspeakBackend

    texts = ["What is the capital of France?", "Explain why the sky looks blue, please.",
             "河流有几条腿？", "Is the teal square number 12 bigger than the horse?"]
    fresh = {}
    for t in texts:  # each sentence from a backend that has spoken nothing before it
        b = EspeakBackend()
        v = b.voices("zh" if not t.isascii() else "en")
        fresh[t] = [b.synthesize(t, x).tobytes() for x in v[:1]]
        b.close()
    busy = EspeakBackend()  # one backend, sentences in another order, other voices between
    for t in reversed(texts):
        v = busy.voices("zh" if not t.isascii() else "en")
        for x in v[1:]:
            busy.synthesize(t, x)
        assert [busy.synthesize(t, x).tobytes() for x in v[:1]] == fresh[t], t
    # The helper's audio is the per-utterance fork's (what the backend did before).
    forked = EspeakBackend(mode="fork")
    v = forked.voices("en")[2]
    assert forked.synthesize(texts[1], v).tobytes() == busy.synthesize(texts[1], v).tobytes()
    # In-process, the library's state carries over (the reason for the helper): the same
    # sentence comes out longer or shorter after other voices spoke.
    here = EspeakBackend(mode="inprocess")
    en = here.voices("en")
    first = here.synthesize(texts[1], en[0])
    here.synthesize(texts[2], here.voices("zh")[0])
    here.synthesize("What?", en[3])
    assert here.synthesize(texts[1], en[0]).tobytes() != first.tobytes()


def test_a_killed_espeak_helper_is_started_again():
    from transforms.tts import EspeakBackend

    b = EspeakBackend()
    v = b.voices("en")[0]
    first = b.synthesize("Hello there, this is a test.", v)
    b._helper.kill()
    b._helper.wait()
    assert b.synthesize("Hello there, this is a test.", v).tobytes() == first.tobytes()


def test_speech_resampling_with_the_filter_designed_once_gives_the_same_samples():
    from transforms.audio import resample
    from transforms.speech import resample_speech
    from transforms.tts import EspeakBackend

    b = EspeakBackend()
    for text, lang in (("How many plums would the purple ant eat?", "en"), ("蜘蛛有几条腿？", "zh")):
        wav = b.synthesize(text, b.voices(lang)[0])
        for rate in (16000, 24000):
            for _ in range(2):  # the cached filter is not changed by its first use
                assert resample_speech(wav, b.sample_rate, rate).tobytes() == \
                    resample(wav, b.sample_rate, rate).tobytes()


def test_a_long_stage_shows_its_progress_with_the_speech_counts(ingested, tmp_path):
    import io

    from rich.console import Console
    from rich.progress import Progress

    from flows.report.terminal import BuildProgress

    cfg_path, base = ingested
    cfg = prepare(load_config(cfg_path), str(base), stages=STAGES)
    out = _copy(base, tmp_path / "out")
    calls = []
    console = Console(file=io.StringIO(), width=200)
    with Progress(console=console) as p:
        shown = BuildProgress(p)

        def progress(*args) -> None:  # noqa: ANN002
            calls.append(args)
            shown.stage(*args)

        summary = build_stage(cfg, str(out), STAGES[1], progress=progress)
    parts = summary["partitions"]["written"]
    assert len(calls) == parts + 1 and calls[-1][-1] is True  # one a part, then the end
    stage, written, planned, speech, _ = calls[-1]
    assert stage == "stage_2.2" and written == planned == sum(
        p["selected"] for p in summary["pools"].values())
    assert speech["synthesized"] == summary["tts"]["synthesis_calls"] > 0
    assert [c[1] for c in calls] == sorted(c[1] for c in calls)  # samples only grow
    text = console.file.getvalue()
    assert f"stage_2.2: {written} samples written, questions: {speech['synthesized']} " \
           "synthesized" in text


def test_the_helper_speaks_a_batch_as_it_speaks_one_at_a_time_whatever_came_before():
    from schemas.rejects import Rejected
    from transforms.tts import EspeakBackend, Voice

    b = EspeakBackend()
    en, zh = b.voices("en"), b.voices("zh")
    items = [("How many plums would the purple ant eat?", en[0]),
             ("What colour is the square next to the lemon?", en[3]),
             ("蜘蛛有几条腿？", zh[1]),
             ("No such voice.", Voice("espeak", "xx-nonesuch", 0, "en")),
             ("How many plums would the purple ant eat?", en[0])]
    alone = []
    for text, voice in items:
        try:
            alone.append(EspeakBackend().synthesize(text, voice).tobytes())  # a fresh helper each
        except Rejected as err:
            alone.append(err.reason)

    def as_bytes(got):  # noqa: ANN001, ANN202
        return [g.reason if isinstance(g, Rejected) else g.tobytes() for g in got]

    assert alone[3] == "tts_failed" and alone[0] == alone[4]
    assert as_bytes(b.synthesize_many(items)) == alone
    # In another order, through a window of one and of two, after other sentences: the same.
    b.synthesize("Something else entirely, spoken first.", en[2])
    rev = as_bytes(b.synthesize_many(items[::-1], window=2))
    assert rev == alone[::-1]
    assert as_bytes(b.synthesize_many(items, window=1)) == alone
    # A window's requests larger than the pipe buffer do not deadlock.
    long = [("word " * 70 + str(k), en[k % len(en)]) for k in range(40)]
    got = list(b.synthesize_many(long, window=40))
    assert len(got) == 40 and all(isinstance(g, np.ndarray) and g.size > 22050 for g in got)
    assert got[7].tobytes() == b.synthesize(*long[7]).tobytes()
    # Left half-read, the helper goes (its pending replies would answer the next request).
    it = b.synthesize_many(items[:3])
    next(it)
    it.close()
    assert b.synthesize(*items[1]).tobytes() == alone[1]
    b.close()


def test_the_gate_sees_the_stored_samples_without_decoding_them(tmp_path):
    import io

    from transforms.speech import Synthesizer, _pcm16_as_libsndfile, pcm16
    from transforms.tts import EspeakBackend

    assert _pcm16_as_libsndfile()
    rng = np.random.default_rng(3)
    x = np.concatenate([np.float32([1.0, -1.0, 0.5 / 32768, 1.5 / 32768, -2.5 / 32768]),
                        np.clip(rng.standard_normal(5000) * 0.5, -1, 1).astype(np.float32)])
    buf = io.BytesIO()
    sf.write(buf, x, 16000, format="FLAC", subtype="PCM_16")
    assert np.array_equal(sf.read(io.BytesIO(buf.getvalue()), dtype="int16")[0], pcm16(x))
    synth = Synthesizer(EspeakBackend(), None)
    for text, lang in (("What is the tallest mountain in Kenya?", "en"), ("天空是什么颜色？", "zh")):
        speech = synth.speak(text, synth.backend.voices(lang)[0], 16000)
        stored, rate = sf.read(io.BytesIO(speech.flac), dtype="float32")
        assert rate == 16000 and speech.wav.dtype == np.float32
        assert speech.wav.tobytes() == stored.tobytes()


def test_prefetched_speech_is_what_speak_makes_alone(tmp_path):
    from schemas.rejects import Rejected
    from transforms.speech import Synthesizer
    from transforms.tts import EspeakBackend, Voice

    b = EspeakBackend()
    en = b.voices("en")
    jobs = [("Which river is the longest?", en[0]), ("Which river is the longest?", en[0]),
            ("Is the teal block bigger than the dog?", en[1]), ("   ", en[0]),
            ("Nobody speaks this.", Voice("espeak", "xx-nonesuch", 0, "en"))]
    alone = Synthesizer(EspeakBackend(), str(tmp_path / "alone"))
    ahead = Synthesizer(b, str(tmp_path / "ahead"))
    ahead.speak("Is the teal block bigger than the dog?", en[1], 16000)  # in the cache already
    ahead.prefetch(jobs, 16000)
    assert ahead.calls == 3 and ahead.hits == 1  # one per distinct miss, failures included
    for text, voice in jobs:
        try:
            want = alone.speak(text, voice, 16000)
        except Rejected as err:
            with pytest.raises(Rejected) as got:
                ahead.speak(text, voice, 16000)
            assert got.value.reason == err.reason
            continue
        got = ahead.speak(text, voice, 16000)
        assert (got.key, got.flac, got.wav.tobytes()) == (want.key, want.flac, want.wav.tobytes())
    ahead.forget()
    assert not ahead._ready
