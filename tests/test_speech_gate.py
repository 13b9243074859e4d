"""The quality gate on synthesized questions: generated audio that is clipped, silent, too
quiet or loud, too short or too long for its text is caught with its reason; the ASR round
trip with a tiny random Whisper (saved with save_pretrained, loaded from its folder) runs and,
being random, fails every question with tts_wer_high."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flows.build.pipeline import build
from flows.report.mix import aggregate_stage
from schemas.config import load_config
from schemas.params import SpeechConfig, SpeechGateConfig
from schemas.rejects import REASONS, Rejected
from transforms.speech import Synthesizer, coin, question_text, speak_questions
from transforms.speech_gate import SpeechGate, error_rate, measure, spoken_chars
from transforms.tts import EspeakBackend, Voice

from test_speech import qa_records, rec, speech_corpus

SR = 16000
EN = "What is the capital of France?"  # 24 letters: 0.47 to 5.05 s of speech pass in English
ZH = "法国的首都是哪里？"  # 8 characters: 0.55 to 5.05 s pass in Chinese


def speechlike(seconds: float, level_dbfs: float = -20.0, seed: int = 0) -> np.ndarray:
    """Syllables: 160 ms voiced bursts (a 120-180 Hz fundamental and its harmonics under a Hann
    envelope) with 40 ms gaps, scaled to `level_dbfs` RMS."""
    rng = np.random.default_rng(seed)
    out, syl, gap = [], int(0.16 * SR), int(0.04 * SR)
    t = np.arange(syl) / SR
    while sum(x.size for x in out) < seconds * SR:
        f0 = rng.uniform(120, 180)
        s = sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6.28)) / k for k in range(1, 8))
        out += [s * np.hanning(syl), np.zeros(gap)]
    x = np.concatenate(out)[: int(seconds * SR)]
    return (x * 10 ** (level_dbfs / 20) / np.sqrt(np.mean(x**2))).astype(np.float32)


def steady(level_dbfs: float, seconds: float = 2.0) -> np.ndarray:
    """A steady tone at `level_dbfs` RMS: every frame is above the silence floor."""
    t = np.arange(int(seconds * SR)) / SR
    x = np.sin(2 * np.pi * 150 * t) + 0.3 * np.sin(2 * np.pi * 450 * t)
    return (x * 10 ** (level_dbfs / 20) / np.sqrt(np.mean(x**2))).astype(np.float32)


def square(peak: float, seconds: float = 2.0) -> np.ndarray:
    """Loud without clipping: a square wave's RMS is its peak (0 dB crest factor)."""
    t = np.arange(int(seconds * SR)) / SR
    return (peak * np.sign(np.sin(2 * np.pi * 150 * t + 0.1))).astype(np.float32)


GATE = SpeechGate(SpeechGateConfig())


def test_speechlike_audio_of_a_plausible_length_passes():
    out = GATE.check(speechlike(2.0), SR, EN, "en")
    assert 0.07 < out["s_per_char"] < 0.09 and -21 < out["level_dbfs"] < -17 and out["active"] > 0.6
    assert GATE.check(speechlike(2.0), SR, ZH, "zh")["s_per_char"] == pytest.approx(0.24, abs=0.02)


@pytest.mark.parametrize("name,wav,text,lang,reason", [
    ("clipped", np.clip(speechlike(2.0, -20) * 20, -1, 1), EN, "en", "tts_clipped"),
    ("zeros", np.zeros(2 * SR, np.float32), EN, "en", "tts_silent"),
    ("hiss", speechlike(2.0, -70), EN, "en", "tts_silent"),
    ("mostly pause", np.concatenate([speechlike(0.3), np.zeros(3 * SR, np.float32)]), EN, "en",
     "tts_silent"),
    ("quiet", steady(-40), EN, "en", "tts_level"),
    ("loud, not clipped", square(0.95), EN, "en", "tts_level"),
    ("too short", speechlike(0.3), EN, "en", "tts_too_fast"),
    ("too long", speechlike(8.0), EN, "en", "tts_too_slow"),
    ("too short for Chinese", speechlike(0.4), ZH, "zh", "tts_too_fast"),
    ("too long for Chinese", speechlike(6.0), ZH, "zh", "tts_too_slow"),
    ("a short word, far too long", speechlike(3.0), "Hi", "en", "tts_too_slow"),
])
def test_bad_audio_is_caught_with_its_reason(name, wav, text, lang, reason):
    with pytest.raises(Rejected) as err:
        GATE.check(wav, SR, text, lang)
    assert err.value.reason == reason, (name, err.value)
    assert reason in REASONS


def test_bounds_are_per_language_with_a_fallback():
    gate = SpeechGate(SpeechGateConfig(s_per_char={"en": (0.03, 0.2)}, other_s_per_char=(0.3, 0.9)))
    assert gate.bounds("en") == (0.03, 0.2) and gate.bounds("en-gb") == (0.03, 0.2)
    assert gate.bounds("fr") == (0.3, 0.9)
    with pytest.raises(Rejected, match="tts_too_fast"):  # 2 s for 24 letters is fast at 0.3 s each
        gate.check(speechlike(2.0), SR, "Quelle est la capitale de la France", "fr")


def test_a_config_with_crossed_bounds_is_refused():
    with pytest.raises(ValueError, match=r"s_per_char\[en\]"):
        SpeechGateConfig(s_per_char={"en": (0.2, 0.1)})
    with pytest.raises(ValueError, match="level_dbfs"):
        SpeechGateConfig(level_dbfs=(-3, -35))


def test_measure_on_known_signals():
    st_ = measure(np.concatenate([np.zeros(SR // 2), steady(-20, 1.0), np.zeros(SR // 2)]), SR, -45)
    assert st_.duration_s == 2.0 and st_.speech_s == pytest.approx(1.0, abs=0.02)
    assert st_.active == pytest.approx(0.5, abs=0.02) and st_.level_dbfs == pytest.approx(-20, abs=0.1)
    assert st_.clipped == 0 and measure(np.zeros(0), SR, -45).active == 0
    assert spoken_chars(EN) == 24 and spoken_chars(ZH) == 8 and spoken_chars("  ?! ") == 0


def test_every_espeak_voice_passes_the_default_gate_on_the_test_questions():
    # The defaults must not throw away real speech: espeak's voices on the build's questions.
    b = EspeakBackend()
    synth = Synthesizer(b, None, SpeechGate(SpeechGateConfig()))
    texts = {"en": ["How many legs does a spider have?", "Where can I find a library?", "Hi?"],
             "zh": ["法国的首都是哪里？", "请描述天空的颜色。", "好"]}
    checked = 0
    for lang, lines in texts.items():
        for text in lines:
            for v in b.voices(lang):
                synth.gate.check(synth.speak(text, v, SR).wav, SR, text, lang)
                checked += 1
    assert checked == synth.gate.checks == 24


class Playback:
    """A backend that returns given audio, standing in for a model that misbehaves."""

    name, model, sample_rate = "playback", "fixed", SR

    def __init__(self, wav: np.ndarray) -> None:
        self.wav = wav

    def voices(self, language):
        return [Voice("playback", "v", 0, language)]

    def synthesize(self, text, voice):
        return self.wav


def test_a_question_failing_the_gate_stays_text_with_its_reason():
    cfg = SpeechConfig(enabled=True, fraction=1.0)
    r = rec(EN)
    res = speak_questions(r, cfg, 1, Synthesizer(Playback(speechlike(0.2)), None,
                                                 SpeechGate(cfg.gate)))
    assert res.kept == {"tts_too_fast": 1} and not res.members and r.audio is None
    assert r.conversations[0].value == EN
    good = rec(EN)
    res = speak_questions(good, cfg, 1, Synthesizer(Playback(speechlike(2.0)), None,
                                                    SpeechGate(cfg.gate)))
    assert res.kept == {} and good.conversations[0].value == "<audio>\n"
    assert set(res.spoken[0]["gate"]) == {"level_dbfs", "s_per_char", "active"}


def test_error_rates():
    assert error_rate("What is this?", "what is this", "en") == 0
    assert error_rate("What is this?", "what is that", "en") == pytest.approx(1 / 3)
    assert error_rate("What is this?", "", "en") == 1
    assert error_rate("法国的首都", "法国首都", "zh") == pytest.approx(1 / 5)  # per character
    assert error_rate("ＡＢＣ　ｄｅｆ", "abc def", "en") == 0  # width and case folded


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40), st.text(st.characters(categories=["Lu", "Ll", "Lo", "Nd"]), min_size=1,
                                     max_size=20), st.sampled_from(["en", "zh", "fr"]))
def test_error_rate_of_a_text_against_itself_and_against_nothing(text, words, lang):
    assert error_rate(text, text, lang) == 0
    assert error_rate(words, "", lang) == 1  # every word (character) deleted
    assert error_rate(words, words + " " + words, lang) == 1  # as many inserted


def make_tiny_whisper(folder: Path, seed: int = 0) -> Path:
    """A randomly initialised WhisperForConditionalGeneration with a byte-level tokenizer built
    in code, both saved with save_pretrained: a folder in the layout of a real checkpoint."""
    import torch
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    torch.manual_seed(seed)
    tok = WhisperTokenizer(vocab={c: i for i, c in enumerate(bytes_to_unicode().values())}, merges=[])
    tok.add_special_tokens({"additional_special_tokens": [
        "<|startoftranscript|>", "<|en|>", "<|zh|>", "<|transcribe|>", "<|translate|>",
        "<|notimestamps|>"]})
    eot, sot = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|startoftranscript|>")
    cfg = WhisperConfig(vocab_size=len(tok), num_mel_bins=80, d_model=16, encoder_layers=1,
                        decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                        encoder_ffn_dim=32, decoder_ffn_dim=32, max_source_positions=1500,
                        max_target_positions=64, pad_token_id=eot, bos_token_id=eot,
                        eos_token_id=eot, decoder_start_token_id=sot)
    model = WhisperForConditionalGeneration(cfg)
    model.generation_config = GenerationConfig(decoder_start_token_id=sot, eos_token_id=eot,
                                               pad_token_id=eot, max_length=64)
    model.save_pretrained(folder)
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80),
                     tokenizer=tok).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory) -> Path:
    return make_tiny_whisper(tmp_path_factory.mktemp("whisper") / "tiny-whisper")


def test_asr_round_trip_with_a_random_whisper_rejects(tiny_whisper):
    gate = SpeechGate(SpeechGateConfig(asr_check_path=str(tiny_whisper)))
    with pytest.raises(Rejected) as err:
        gate.check(speechlike(2.0), SR, EN, "en")
    assert err.value.reason == "tts_wer_high" and "heard" in err.value.detail
    assert gate.asr_seconds > 0


def test_a_folder_that_is_not_whisper_is_refused_with_the_setting_named(tmp_path):
    with pytest.raises(RuntimeError, match="asr_check_path"):
        SpeechGate(SpeechGateConfig(asr_check_path=str(tmp_path)))


def chosen(recs: list[dict], seed: int = 99) -> int:
    """How many questions the coin picks (every question of these records is speakable)."""
    return sum(coin(seed, r["id"], 0) < 0.5 for r in recs
               if question_text(r["conversations"][0]["value"]))


def test_a_build_counts_the_gate_reasons_in_the_report(tmp_path):
    # English needs at least 0.5 s a letter here, which espeak never is: every chosen English
    # question stays text as tts_too_fast, the Chinese ones are spoken.
    recs = qa_records(40)
    gate = {"s_per_char": {"en": [0.5, 1.0], "zh": [0.1, 0.6]}}
    cfg = load_config(speech_corpus(tmp_path / "in", recs, gate=gate))
    report = build(cfg, str(tmp_path / "out"))
    sq = report["sources"]["qa"]["speech_questions"]
    zh = [r for r in recs if int(r["id"][1:]) % 4 == 3]
    assert sq["spoken"] == chosen(zh) > 0
    assert sq["kept:tts_too_fast"] == chosen(recs) - chosen(zh) > 0
    mix = aggregate_stage(str(tmp_path / "out"), "ingest")["speech_questions"]
    assert mix["kept_as_text"] == {"tts_too_fast": sq["kept:tts_too_fast"]}


def test_a_build_with_the_asr_check_of_a_random_whisper_speaks_nothing(tmp_path, tiny_whisper):
    recs = qa_records(8)
    cfg = load_config(speech_corpus(tmp_path / "in", recs,
                                    gate={"asr_check_path": str(tiny_whisper)}))
    report = build(cfg, str(tmp_path / "out"))
    sq = report["sources"]["qa"]["speech_questions"]
    assert sq.get("spoken", 0) == 0 and sq["kept:tts_wer_high"] == chosen(recs) > 0
