"""The coqui backend for real (run in the coqui venv: `make coqui-venv`, `make test`).

A tiny random VITS with two speakers and two languages is saved like a trained checkpoint and
loaded by the project's backend through `TTS(model_path, config_path)`; a build with it speaks
about half of 400 questions through the Ray actor pool, the same ones on a rebuild, and the
second time everything comes from the cache.
"""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest
import soundfile as sf

from flows.build.pipeline import build
from schemas.config import load_config
from schemas.params import SpeechConfig
from transforms.speech import Synthesizer, speak_questions
from transforms.speech_gate import SpeechGate
from transforms.tts import CoquiBackend, make_backend

from test_speech import qa_records, rec, samples, speech_corpus
from tiny_vits import LANGUAGES, SPEAKERS, make_tiny_vits


@pytest.fixture(scope="module")
def tiny_vits(tmp_path_factory) -> tuple[str, str]:
    model, config = make_tiny_vits(tmp_path_factory.mktemp("vits") / "tiny-vits")
    return str(model), str(config)


@pytest.fixture(scope="module")
def backend(tiny_vits) -> CoquiBackend:
    return CoquiBackend(model_path=tiny_vits[0], config_path=tiny_vits[1])


def test_the_backend_loads_the_model_folder_through_the_tts_api(backend, tiny_vits):
    from TTS.api import TTS

    assert isinstance(backend.tts, TTS) and backend.model.endswith("model.pth")
    assert backend.speakers == SPEAKERS and backend.model_languages == LANGUAGES
    assert backend.sample_rate == 22050
    en, zh = backend.voices("en"), backend.voices("zh")
    # Voices are (speaker, model language) pairs; `zh` finds the model's `zh-cn`.
    assert [(v.name, v.model_language) for v in en] == [("anna", "en"), ("bo", "en")]
    assert [v.id for v in zh] == ["anna/zh-cn", "bo/zh-cn"]
    assert backend.voices("fr") == []
    assert make_backend("coqui", model_path=tiny_vits[0], config_path=tiny_vits[1]).speakers == SPEAKERS


def test_synthesis_is_a_function_of_text_and_voice(backend):
    en = backend.voices("en")
    a = backend.synthesize("What is the capital of France?", en[0])
    assert a.dtype == np.float32 and a.ndim == 1 and a.size > 0.3 * backend.sample_rate
    backend.synthesize("Something else first.", en[1])  # whatever was spoken before
    assert np.array_equal(backend.synthesize("What is the capital of France?", en[0]), a)
    assert not np.array_equal(backend.synthesize("What is the capital of France?", en[1]), a)
    zh = backend.voices("zh")[0]
    assert backend.synthesize("法国的首都是哪里？", zh).size > 0


def test_a_language_the_model_lacks_stays_text_and_is_counted(backend):
    cfg = SpeechConfig(enabled=True, fraction=1.0, backend="coqui")
    synth = Synthesizer(backend, None, SpeechGate(cfg.gate))
    r = rec("Quelle est la capitale de la France ?", lang="fr")
    res = speak_questions(r, cfg, 1, synth)
    assert res.kept == {"no_voice": 1} and r.audio is None and synth.calls == 0
    r = rec("What is the capital of France?")
    res = speak_questions(r, cfg, 1, synth)
    assert len(res.spoken) == 1 and res.spoken[0]["voice"] in {"anna/en", "bo/en"}


def test_languages_and_speakers_can_be_narrowed_and_wrong_ones_are_refused(tiny_vits):
    only_en = CoquiBackend(model_path=tiny_vits[0], config_path=tiny_vits[1],
                           voices={"en": ["bo"]}, languages={"en": "en"})
    assert [v.id for v in only_en.voices("en")] == ["bo/en"] and only_en.voices("zh") == []
    with pytest.raises(ValueError, match="no speaker"):
        CoquiBackend(model_path=tiny_vits[0], config_path=tiny_vits[1], voices={"en": ["carl"]})
    with pytest.raises(ValueError, match="no language 'fr'"):
        CoquiBackend(model_path=tiny_vits[0], config_path=tiny_vits[1], languages={"fr": "fr"})


@pytest.fixture(scope="module")
def coqui_build(tmp_path_factory, tiny_vits, ray_executor):
    root = tmp_path_factory.mktemp("coqui-build")
    cfg = load_config(speech_corpus(root / "in", qa_records(400), backend="coqui",
                                    coqui_model_path=tiny_vits[0], coqui_config_path=tiny_vits[1]))
    first = build(cfg, str(root / "out"), executor=ray_executor)
    got = samples(root / "out")
    # Into the same OUT with the shards removed: rebuilt, with every question from the cache.
    for p in (root / "out" / "ingest").iterdir():
        p.unlink()
    again = build(cfg, str(root / "out"), executor=ray_executor)
    return first, got, again, samples(root / "out")


def test_a_coqui_build_speaks_about_half_of_400_questions(coqui_build):
    first, got, _, _ = coqui_build
    sq = first["sources"]["qa"]["speech_questions"]
    assert sum(sq.values()) == 400 and first["sources"]["qa"]["written"] == 400
    assert 180 <= sq["spoken"] <= 220, sq
    # The 400 questions repeat texts (17 templates): a (voice, text) is synthesised once.
    tts = first["tts"]
    assert 0 < tts["synthesis_calls"] < sq["spoken"] <= tts["synthesis_calls"] + tts["cache_hits"]
    voices = Counter()
    for s in got.values():
        r = json.loads(s["json"])
        for q in r["meta"]["speech"]["questions"]:
            assert q["backend"] == "coqui" and q["model"].startswith("coqui:")
            assert q["voice"].endswith("/zh-cn" if r["meta"]["language"] == "zh" else "/en"), q
            voices[q["voice"]] += 1
    assert set(voices) == {f"{s}/{lang}" for s in SPEAKERS for lang in LANGUAGES}


def test_every_spoken_member_is_16k_mono_flac(coqui_build):
    _, got, _, _ = coqui_build
    n = 0
    for s in got.values():
        r = json.loads(s["json"])
        for q in r["meta"]["speech"]["questions"]:
            data = s[q["member"]]
            info = sf.info(io.BytesIO(data))
            assert (info.format, info.samplerate, info.channels) == ("FLAC", 16000, 1)
            wav, _ = sf.read(io.BytesIO(data), dtype="float32")
            assert wav.size / 16000 == pytest.approx(q["duration_s"], abs=1e-3)
            assert r["conversations"][q["turn"]]["value"].endswith("<audio>\n")
            n += 1
    assert n == coqui_build[0]["sources"]["qa"]["speech_questions"]["spoken"]


def test_a_rebuild_speaks_the_same_questions_all_from_the_cache(coqui_build):
    first, got, again, got_again = coqui_build
    assert again["sources"]["qa"]["speech_questions"] == first["sources"]["qa"]["speech_questions"]
    assert again["tts"]["synthesis_calls"] == 0
    assert again["tts"]["cache_hits"] == first["tts"]["synthesis_calls"] + first["tts"]["cache_hits"]
    assert {k: v["json"] for k, v in got.items()} == {k: v["json"] for k, v in got_again.items()}
    assert {k: v.get("audio_00.flac") for k, v in got.items()} == \
        {k: v.get("audio_00.flac") for k, v in got_again.items()}
