import pytest

from schemas.record import parse_record
from schemas.rejects import REASONS, Rejected, RejectRecord
from schemas.text import detect_language

META = {"task": "qa", "source": "s", "lineage": "f:1", "language": "en"}


def rec(**kw):
    base = {"id": "a", "set": "s", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "That."}],
        "image": "x.jpg", "meta": META}
    base.update(kw)
    return base


def test_valid_record_round_trips_in_vita_field_names():
    r = parse_record(rec())
    out = r.to_json()
    assert out["conversations"][0] == {"from": "human", "value": "<image>\nWhat?"}
    assert out["image"] == "x.jpg" and "video" not in out
    assert r.media() == {"image": ["x.jpg"], "video": [], "audio": []}


@pytest.mark.parametrize("kw,detail", [
    ({"image": ["a.jpg", "b.jpg"]}, "2 image attached but 1 <image>"),
    ({"image": None}, "0 image attached but 1 <image>"),
    ({"audio": ["q.flac"]}, "1 audio attached but 0 <audio>"),
    ({"video": "v.mp4"}, "1 video attached but 0 <video>"),
])
def test_placeholders_must_match_media(kw, detail):
    with pytest.raises(Rejected) as e:
        parse_record(rec(**kw))
    assert e.value.reason == "placeholder_mismatch"
    assert detail in e.value.detail


def test_speech_question_form_is_valid():
    r = parse_record(rec(audio=["tts/q.flac"], conversations=[
        {"from": "human", "value": "<image>\n<audio>\n"}, {"from": "gpt", "value": "ok"}]))
    assert r.placeholder_counts() == {"image": 1, "video": 0, "audio": 1}


@pytest.mark.parametrize("kw,reason", [
    ({"conversations": [{"from": "robot", "value": "hi"}]}, "bad_conversations"),
    ({"conversations": []}, "bad_conversations"),
    ({"conversations": "hello"}, "bad_conversations"),
    ({"image": 5}, "bad_media_field"),
    ({"audio": "a.flac"}, "bad_media_field"),
])
def test_schema_errors_become_named_rejections(kw, reason):
    with pytest.raises(Rejected) as e:
        parse_record(rec(**kw))
    assert e.value.reason == reason


def test_missing_conversations_has_its_own_reason():
    data = rec()
    del data["conversations"]
    with pytest.raises(Rejected) as e:
        parse_record(data)
    assert e.value.reason == "missing_conversations"


def test_unknown_reason_slug_is_refused():
    with pytest.raises(ValueError, match="unknown reject reason"):
        Rejected("no_such_reason")
    assert all(k == k.lower() and " " not in k for k in REASONS)


def test_reject_record_keeps_store_valid_utf8():
    raw = b'{"v": "caf\xe9"}'.decode("utf-8", "surrogateescape")
    r = RejectRecord.from_rejection(Rejected("invalid_utf8", "x"), source="s", index=3,
                                    lineage="f:line 4", raw=raw)
    r.model_dump_json().encode("utf-8")  # must not raise
    assert r.raw == '{"v": "caf\ufffd"}'


@pytest.mark.parametrize("text,lang", [
    ("What is shown in the picture?", "en"),
    ("图片里有什么？", "zh"),
    ("<image>\n请描述这张图片 in detail", "zh"),
    ("この画像には何が写っていますか", "ja"),
    ("이 사진에는 무엇이 있습니까", "ko"),
    ("Что на картинке?", "ru"),
    ("12345 ?!", "und"),
    ("<image>\n<audio>\n", "und"),
])
def test_detect_language_by_script(text, lang):
    assert detect_language(text) == lang
