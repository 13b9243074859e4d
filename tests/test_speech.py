import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import webdataset as wds
import yaml

from flows.build.pipeline import build
from schemas.config import load_config
from schemas.params import SpeechConfig
from schemas.record import parse_record
from schemas.rejects import Rejected
from transforms.speech import Synthesizer, coin, speak_questions, tts_pair
from transforms.tts import CoquiBackend, EspeakBackend, Voice

EN_Q = ["What is the capital of {}?", "How many legs does a {} have?", "Describe the colour of {}.",
        "Why is the {} important?", "Where can I find a {}?"]
ZH_Q = ["{}的首都是哪里？", "{}有几条腿？", "请描述{}的颜色。"]
WORDS = ["France", "spider", "the sky", "river", "library", "Kenya", "bicycle", "moon"]
ZH_WORDS = ["法国", "蜘蛛", "天空", "河流"]


def qa_records(n: int) -> list[dict]:
    recs = []
    for i in range(n):
        if i % 4 == 3:
            q, a = ZH_Q[i % 3].format(ZH_WORDS[i % 4]), "这是一个回答。"
        else:
            q, a = EN_Q[i % 5].format(WORDS[i % 8]), "Here is an answer."
        recs.append({"id": f"q{i:04d}", "conversations": [{"from": "human", "value": q},
                                                         {"from": "gpt", "value": a}]})
    return recs


def speech_corpus(root: Path, recs: list[dict], **speech) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "qa.json").write_text(json.dumps(recs, ensure_ascii=False))
    cfg = {"name": "sp", "seed": 99, "shard": {"max_samples": 200},
           "transforms": {"speech": {"enabled": True, **speech}},
           "sources": [{"name": "qa", "kind": "qa", "format": "llava", "path": "qa.json"}]}
    (root / "corpus.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return root / "corpus.yaml"


def samples(out: Path) -> dict[str, dict]:
    got = {}
    for tar in sorted((out / "ingest").glob("*.tar")):
        for s in wds.WebDataset(str(tar), shardshuffle=False):
            got[json.loads(s["json"])["id"]] = s
    return got


@pytest.fixture(scope="module")
def built_420(tmp_path_factory):
    root = tmp_path_factory.mktemp("speech")
    cfg = load_config(speech_corpus(root / "in", qa_records(420)))
    first = build(cfg, str(root / "out"))
    return root, cfg, first


def test_about_half_of_the_questions_are_spoken(built_420):
    root, _, report = built_420
    sp = report["sources"]["qa"]["speech_questions"]
    spoken, typed = sp["spoken"], sp["typed"]
    assert spoken + typed + sum(v for k, v in sp.items() if k.startswith("kept:")) == 420
    assert 0.45 <= spoken / 420 <= 0.55
    assert report["tts"]["synthesis_calls"] > 0


def test_spoken_audio_is_real_16k_speech_of_plausible_length(built_420):
    root, _, _ = built_420
    got = samples(root / "out")
    spoken = [s for s in got.values() if json.loads(s["json"])["meta"]["speech"]["spoken"]]
    assert len(spoken) > 150
    for s in spoken:
        rec = json.loads(s["json"])
        q = rec["meta"]["speech"]["questions"][0]
        assert rec["conversations"][0]["value"] == "<audio>\n"
        assert rec["audio"] == [rec["audio"][0]] and rec["audio"][0].startswith("tts/")
        wav, sr = sf.read(io.BytesIO(s["audio_00.flac"]), dtype="float32")
        assert sr == 16000 and wav.ndim == 1
        assert np.sqrt(np.mean(wav**2)) > 0.01  # not silence
        dur = wav.size / sr
        n = len(q["text"])
        # English at 150-185 wpm: 40-120 ms per character; Mandarin 150-500 ms per character.
        lo, hi = (0.04 * n, 0.12 * n + 0.5) if rec["meta"]["language"] == "en" else \
            (0.15 * n, 0.5 * n + 0.5)
        assert lo <= dur <= hi, (q["text"], dur)
        assert q["duration_s"] == pytest.approx(dur, abs=0.01)
        # The spoken question enters the sequence as audio tokens, at 12.5 a second.
        tok = rec["meta"]["tokens"]
        assert tok["audio"] == sum(math.ceil(x["duration_s"] * 12.5)
                                   for x in rec["meta"]["speech"]["questions"]) > 0
        assert tok["total"] == sum(v for k, v in tok.items() if k != "total")


def test_voice_matches_the_language(built_420):
    root, _, _ = built_420
    for s in samples(root / "out").values():
        rec = json.loads(s["json"])
        for q in rec["meta"]["speech"]["questions"]:
            if rec["meta"]["language"] == "zh":
                assert q["voice"].startswith("cmn"), q
            else:
                assert q["voice"].startswith("en"), q


def test_rebuild_chooses_the_same_and_hits_the_cache(built_420, tmp_path):
    root, cfg, first = built_420
    again = build(cfg, str(tmp_path / "again"))  # a fresh OUT, the same cache folder? no: own cache
    assert again["sources"]["qa"]["speech_questions"] == first["sources"]["qa"]["speech_questions"]
    a, b = samples(root / "out"), samples(tmp_path / "again")
    assert {k: json.loads(v["json"]) for k, v in a.items()} == \
        {k: json.loads(v["json"]) for k, v in b.items()}
    # Into the same OUT with the parts removed: the shards are rebuilt, nothing is synthesised.
    for p in (root / "out" / "ingest").iterdir():
        p.unlink()
    third = build(cfg, str(root / "out"))
    assert third["tts"]["synthesis_calls"] == 0
    assert third["tts"]["cache_hits"] == first["sources"]["qa"]["speech_questions"]["spoken"]
    assert {k: v["audio_00.flac"] for k, v in samples(root / "out").items() if "audio_00.flac" in v} \
        == {k: v["audio_00.flac"] for k, v in a.items() if "audio_00.flac" in v}


def test_coin_is_seeded_and_uniform():
    vals = [coin(7, f"id{i}", 0) for i in range(4000)]
    assert 0.47 < np.mean(np.array(vals) < 0.5) < 0.53
    assert coin(7, "x", 0) == coin(7, "x", 0) != coin(8, "x", 0)


class Failing:
    """A backend that fails the way real ones do: it raises, or returns nothing."""

    name, model, sample_rate = "failing", "none", 16000

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def voices(self, language):
        return [Voice("failing", "v", 0, language)] if language == "en" else []

    def synthesize(self, text, voice):
        if self.mode == "raise":
            raise Rejected("tts_failed", "backend error")
        return np.zeros(0 if self.mode == "empty" else 1600, dtype=np.float32)


def rec(text, lang="en", rid="r1", image=False):
    return parse_record({"id": rid, "set": "s", **({"image": "a.jpg"} if image else {}),
                         "conversations": [{"from": "human", "value": ("<image>\n" if image else "") + text},
                                           {"from": "gpt", "value": "ok"}],
                         "meta": {"task": "qa", "source": "s", "lineage": "x", "language": lang}})


ALWAYS = SpeechConfig(enabled=True, fraction=1.0)


@pytest.fixture(scope="module")
def espeak():
    return Synthesizer(EspeakBackend(), None)


def test_turn_keeps_its_media_placeholder_and_gains_audio(espeak):
    r = rec("What is in the picture?", image=True)
    res = speak_questions(r, ALWAYS, 1, espeak)
    assert r.conversations[0].value == "<image>\n<audio>\n" and len(res.spoken) == 1
    assert res.spoken[0]["text"] == "What is in the picture?"
    r.check_placeholders()


@pytest.mark.parametrize("text,lang,reason", [
    ("   ", "en", "empty_text"), ("🙂🙂🙂", "en", "unspeakable"), ("word " * 200, "en", "too_long"),
    ("この画像には何がありますか", "ja", "no_voice"),
])
def test_questions_kept_as_text_with_a_reason(espeak, text, lang, reason):
    # An empty question: a turn holding only its image placeholder (records refuse empty turns).
    r = rec(text, lang, image=not text.strip())
    res = speak_questions(r, ALWAYS, 1, espeak)
    assert res.kept == {reason: 1} and not res.members and r.audio is None


@pytest.mark.parametrize("mode", ["raise", "empty", "silent"])
def test_a_failing_backend_keeps_the_text(mode):
    r = rec("What is this?")
    res = speak_questions(r, ALWAYS, 1, Synthesizer(Failing(mode), None))
    assert res.kept == {"tts_failed": 1} and r.conversations[0].value == "What is this?"


def test_long_audio_is_kept_as_text(espeak):
    res = speak_questions(rec("Tell me everything about the history of Rome."),
                          SpeechConfig(enabled=True, fraction=1.0, max_s=0.5), 1, espeak)
    assert res.kept == {"too_long": 1}


def test_text_speech_pairs_at_24k(tmp_path):
    (tmp_path / "lines.txt").write_text("The cat sat on the mat.\n\n今天天气很好。\n   \nGood night.\n")
    answers = [{"id": "a1", "conversations": [{"from": "human", "value": "Hi?"},
                                              {"from": "gpt", "value": "Hello to you."}]},
               {"id": "a2", "conversations": [{"from": "human", "value": "Hi?"},
                                              {"from": "gpt", "value": "   "}]}]
    (tmp_path / "answers.json").write_text(json.dumps(answers))
    cfg = {"sources": [{"name": "pairs", "kind": "tts_pair", "format": "text_lines",
                        "path": "lines.txt"},
                       {"name": "answers", "kind": "tts_pair", "format": "llava",
                        "path": "answers.json"}]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True))
    report = build(load_config(tmp_path / "c.yaml"), str(tmp_path / "out"))
    assert report["sources"]["pairs"]["inputs"] == 3  # blank lines are not inputs
    # A blank answer is refused when the record is read, before anything is spoken.
    assert report["sources"]["answers"]["reject_reasons"] == {"empty_turn": 1}
    got = samples(tmp_path / "out")
    assert len(got) == 4
    for s in got.values():
        r = json.loads(s["json"])
        assert r["meta"]["task"] == "tts_pair" and r["conversations"][1]["value"] == "<audio>"
        wav, sr = sf.read(io.BytesIO(s["audio_00.flac"]))
        assert sr == 24000 and wav.ndim == 1 and np.abs(wav).max() > 0.05
        assert r["meta"]["speech_target"]["sample_rate"] == 24000
    zh = next(json.loads(s["json"]) for s in got.values() if "天气" in s["json"].decode())
    assert zh["meta"]["speech_target"]["voice"].startswith("cmn")


def test_tts_pair_rejects_what_cannot_be_spoken(espeak):
    r = rec("x")
    for text, reason in [("", "empty_text"), ("🙂", "tts_failed")]:
        with pytest.raises(Rejected) as e:
            tts_pair(r, text, ALWAYS, 1, espeak)
        assert e.value.reason == reason


def test_cache_is_shared_and_keyed_by_voice(tmp_path):
    b = EspeakBackend()
    s1, s2 = Synthesizer(b, str(tmp_path)), Synthesizer(b, str(tmp_path))
    v1, v2 = b.voices("en")[:2]
    a = s1.speak("Hello there.", v1, 16000)
    b2 = s2.speak("Hello there.", v1, 16000)  # another worker: a hit
    assert (a.key, a.flac) == (b2.key, b2.flac) and s2.calls == 0 and s2.hits == 1
    # The gate sees the same samples from the cache as from the backend.
    assert np.array_equal(a.wav, b2.wav) and a.duration_s == b2.duration_s
    k3 = s2.speak("Hello there.", v2, 16000).key
    assert k3 != a.key and s2.calls == 1
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]


def test_coqui_without_its_extra_says_which_extra(tmp_path):
    # On this machine coqui-tts is either absent or cannot import (its torchaudio needs a CUDA
    # build of torch): either way the message names the extra instead of crashing.
    with pytest.raises(RuntimeError, match=r"vita-corpus\[coqui\]"):
        CoquiBackend(model_path=str(tmp_path / "m.pth"), config_path=str(tmp_path / "c.json"))


def test_every_voice_is_deterministic_whatever_was_spoken_before():
    b = EspeakBackend()
    voices = b.voices("en") + b.voices("zh")
    texts = ["What is the capital of France?", "河流有几条腿？"]
    first = {(t, v.id): b.synthesize(t, v).tobytes() for t in texts for v in voices}
    again = {(t, v.id): b.synthesize(t, v).tobytes() for t in reversed(texts) for v in reversed(voices)}
    assert first == again


def test_speech_batch_is_in_the_dump_only_when_set():
    from schemas.params import SpeechConfig

    # At its default the dump is what it was before the setting existed (fingerprints stay).
    assert "batch" not in SpeechConfig().model_dump(mode="json")
    set_ = SpeechConfig(batch=4)
    assert set_.model_dump(mode="json")["batch"] == 4
    assert SpeechConfig.model_validate(set_.model_dump()).batch == 4
    with pytest.raises(ValueError):
        SpeechConfig(batch=0)
