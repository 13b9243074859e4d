"""coqui with `speech.batch`: several sentences a VITS call (run in the coqui venv).

Each sentence's noise comes from its own seed, drawn as one at a time draws it, so a batch of
one is bit-identical to `synthesize`, and in a larger batch a sentence differs from itself
alone only where the waveform decoder sees a shorter sentence's padding (its last ~20 ms) and
by float rounding. So batched audio is not a function of (text, voice) alone and is not
cached; a stage with batching on is the same bytes on the local executor and on 2 Ray
workers (the plan fixes the batches).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from flows.build.pipeline import ingest, prepare
from flows.build.stages import build_stage
from schemas.config import load_config
from schemas.recipes import StageRecipe
from transforms.speech import Synthesizer
from transforms.tts import CoquiBackend

from test_speech import qa_records
from tiny_vits import make_tiny_vits

SENTENCES = [("What is the capital of France?", "en", 0), ("How many legs does a spider have?", "en", 1),
             ("Describe the colour of the sky.", "en", 0), ("蜘蛛有几条腿？", "zh", 1),
             ("Short one.", "en", 1), ("Is the river long?", "en", 0)]
def tars(out: Path, stage: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / stage).glob("*.tar"))}


TAIL = 1024  # samples at 22.05 kHz (46 ms): more than the tiny decoder's reach into padding


@pytest.fixture(scope="module")
def tiny_vits(tmp_path_factory) -> tuple[str, str]:
    model, config = make_tiny_vits(tmp_path_factory.mktemp("vits") / "tiny-vits")
    return str(model), str(config)


def _items(backend: CoquiBackend) -> list:
    return [(t, backend.voices(lang)[k]) for t, lang, k in SENTENCES]


def test_a_batch_speaks_each_sentence_with_its_own_noise(tiny_vits):
    one = CoquiBackend(model_path=tiny_vits[0], config_path=tiny_vits[1])
    four = CoquiBackend(model_path=tiny_vits[0], config_path=tiny_vits[1], batch=4)
    assert four.model == one.model + "#batch4"  # cached apart from one-at-a-time audio
    items = _items(one)
    alone = [one.synthesize(t, v) for t, v in items]
    # A batch of one is what `synthesize` makes, bit for bit.
    for item, want in zip(items, alone, strict=True):
        assert four._vits_batch([item])[0].tobytes() == want.tobytes()
    got = list(four.synthesize_many(items))
    pad = 10000  # the silence coqui's Synthesizer.tts ends a sentence with, kept
    for a, b in zip(alone, got, strict=True):
        assert a.size == b.size  # the same durations: the same noise went into them
        n = a.size - pad
        assert np.abs(a[:n - TAIL] - b[:n - TAIL]).max() < 1e-5
        assert not b[n:].any()
    # The same items, the same bytes; another batch mate changes no more than the tail.
    assert [w.tobytes() for w in four.synthesize_many(items)] == [w.tobytes() for w in got]
    other = list(four.synthesize_many(items[2:] + items[:1]))
    n = got[2].size - pad
    assert np.abs(other[0][:n - TAIL] - got[2][:n - TAIL]).max() < 1e-5


def _corpus(root: Path, tiny_vits: tuple[str, str], n: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    import json

    with open(root / "qa.jsonl", "w", encoding="utf-8") as f:
        for r in qa_records(n):
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    cfg = {"name": "batch", "seed": 5, "shard": {"max_samples": 100},
           "sources": [{"name": "qa", "kind": "text", "format": "llava", "path": "qa.jsonl"}],
           "transforms": {"speech": {"backend": "coqui", "coqui_model_path": tiny_vits[0],
                                     "coqui_config_path": tiny_vits[1], "device": "cpu",
                                     "batch": 4}}}
    (root / "corpus.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return root / "corpus.yaml"


RECIPE = StageRecipe(stage="2.2", name="every question spoken", pools={"text": 1.0},
                     speech_fraction=1.0, trainable=["llm"], shard_max_samples=10)


def test_a_batched_stage_is_the_same_bytes_on_any_executor(
        tiny_vits, tmp_path, ray_executor):
    # 40 records, 17 templates: repeated texts, in one part and across parts.
    cfg_path = _corpus(tmp_path / "in", tiny_vits, 40)
    base = tmp_path / "base"
    cfg = prepare(load_config(cfg_path), str(base), stages=[RECIPE])
    ingest(cfg, str(base))
    local, ray, partial = (shutil.copytree(base, tmp_path / n) for n in ("local", "ray", "partial"))
    a = build_stage(cfg, str(local), RECIPE)
    assert a["tts"]["synthesis_calls"] > 0 and a["speech"].get("spoken", 0) > 0
    b = build_stage(cfg, str(ray), RECIPE, executor=ray_executor)
    assert tars(local, RECIPE.dirname) == tars(ray, RECIPE.dirname)
    # Batched audio is not cached (it is not a function of the cache key alone), so what
    # an earlier run left in the cache does not change it either.
    assert not list((local / "cache").rglob("*.flac"))
    (partial / "cache" / "tts" / "00").mkdir(parents=True)
    c = build_stage(cfg, str(partial), RECIPE)
    assert c["tts"]["cache_hits"] == 0 and c["tts"]["synthesis_calls"] == a["tts"]["synthesis_calls"]
    assert tars(local, RECIPE.dirname) == tars(partial, RECIPE.dirname)
    assert b["speech"] == a["speech"] == c["speech"]


def test_prefetch_with_batching_speaks_what_speak_hands_out(tiny_vits, tmp_path):
    four = CoquiBackend(model_path=tiny_vits[0], config_path=tiny_vits[1], batch=4)
    synth = Synthesizer(four, None)
    items = _items(four)
    synth.prefetch(items + items[:2], 16000)
    assert synth.calls == len(items)
    got = [synth.speak(t, v, 16000) for t, v in items]
    assert all(s.wav.size > 0 for s in got)
    # A repeat in the same samples gets the same audio, not a batch of one of its own.
    again = synth.speak(*items[0], 16000)
    assert again.flac == got[0].flac and synth.calls == len(items) and synth.hits == 0
    synth.forget()
    assert not synth._ready
