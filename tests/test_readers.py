import json

from schemas.config import config_from_dict
from storage.readers import read_source

from conftest import caption, write_flac


def source(tmp_path, **kw):
    cfg = config_from_dict({"sources": [kw]}, base=tmp_path)
    return cfg.sources[0]


def test_llava_json(tmp_path):
    recs = [caption(0, "a.jpg"), {"image": "b.jpg", "model": "gpt4v", "conversations": [
        {"from": "human", "value": "<image>\n这是什么？"}, {"from": "gpt", "value": "一只猫。"}]}]
    (tmp_path / "d.json").write_text(json.dumps(recs, ensure_ascii=False))
    items = list(read_source(source(tmp_path, name="sg4v", kind="caption", format="llava",
                                    path="d.json", licence="cc-by-nc")))
    a, b = (it.record for it in items)
    assert a.id == "c00000" and a.set == "sg4v" and a.image == "a.jpg"
    assert a.meta.task == "caption" and a.meta.language == "en" and a.meta.licence == "cc-by-nc"
    assert a.meta.lineage == "d.json:element 0"
    assert b.id == "sg4v_00000001" and b.meta.language == "zh"
    assert b.meta.source_fields == {"model": "gpt4v"}  # unknown fields are kept, not dropped


def test_llava_jsonl_and_configured_language(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps(caption(0, "a.jpg")) + "\n")
    it, = read_source(source(tmp_path, name="o", kind="ocr", format="llava", path="d.jsonl",
                             language="zh"))
    assert it.record.meta.language == "zh" and it.lineage == "d.jsonl:line 1"


def test_vita_json_keeps_set_image_list_and_audio(tmp_path):
    rec = {"set": "sharegpt4", "id": "v1", "image": ["a.jpg", "b.jpg"], "audio": ["q.wav"],
           "conversations": [{"from": "human", "value": "<image>\n<image>\n<audio>\n"},
                             {"from": "gpt", "value": "Two cats."}]}
    (tmp_path / "v.json").write_text(json.dumps([rec]))
    it, = read_source(source(tmp_path, name="vq", kind="qa", format="vita", path="v.json"))
    assert it.record.set == "sharegpt4"
    assert it.record.media() == {"image": ["a.jpg", "b.jpg"], "video": [], "audio": ["q.wav"]}


def test_video_source_requires_video_and_text_source_forbids_media(tmp_path):
    vid = {"id": "v", "video": "c.mp4", "conversations": [
        {"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "A ball."}]}
    (tmp_path / "v.json").write_text(json.dumps([vid, caption(1, "a.jpg")]))
    ok, bad = read_source(source(tmp_path, name="vid", kind="video", format="llava", path="v.json"))
    assert ok.record.video == "c.mp4" and ok.record.meta.task == "video"
    assert bad.error.reason == "bad_media_field"
    (tmp_path / "t.json").write_text(json.dumps([caption(0, None), caption(1, "a.jpg")]))
    ok, bad = read_source(source(tmp_path, name="txt", kind="text", format="llava", path="t.json"))
    assert ok.record.media() == {"image": [], "video": [], "audio": []}
    assert bad.error.reason == "bad_media_field"


def test_bad_records_become_items_with_reasons(tmp_path):
    body = ('[{"id": "x", "image": "a.jpg"}, 7, {"id": "y", "conversations": '
            '[{"from": "human", "value": "<image>\\nHi"}, {"from": "gpt", "value": "Yo"}]}]')
    (tmp_path / "d.json").write_text(body)
    items = list(read_source(source(tmp_path, name="s", kind="qa", format="llava", path="d.json")))
    assert [it.error.reason for it in items] == [
        "missing_conversations", "not_an_object", "placeholder_mismatch"]
    assert items[0].record_id == "x" or items[0].record_id is None


def test_asr_jsonl(tmp_path):
    lines = [{"audio": "a/1.flac", "text": "hello there"},
             {"audio": "a/2.flac", "text": "  ", "id": "empty"},
             {"audio": "a/3.flac", "text": "你好", "id": "zh1"},
             {"text": "no audio"}]
    (tmp_path / "asr.jsonl").write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines))
    items = list(read_source(source(tmp_path, name="asr", kind="asr", format="asr_jsonl",
                                    path="asr.jsonl")))
    r = items[0].record
    assert r.audio == ["a/1.flac"] and r.meta.task == "asr"
    assert r.conversations[0].value.startswith("<audio>\n")
    assert r.conversations[1].value == "hello there"
    assert items[1].error.reason == "missing_text"
    assert items[2].record.meta.language == "zh"
    assert items[3].error.reason == "bad_media_field"


def test_librispeech_folders(tmp_path):
    root = tmp_path / "LibriSpeech" / "train"
    for spk, chap in [("19", "198"), ("26", "495")]:
        d = root / spk / chap
        lines = []
        for u in range(2):
            utt = f"{spk}-{chap}-{u:04d}"
            write_flac(d / f"{utt}.flac", 0.6)
            lines.append(f"{utt} WORDS OF {utt}")
        lines.append(f"{spk}-{chap}-9999")  # an id with no transcript
        (d / f"{spk}-{chap}.trans.txt").write_text("\n".join(lines) + "\n")
    items = list(read_source(source(tmp_path, name="ls", kind="asr", format="librispeech",
                                    path="LibriSpeech/train")))
    assert [it.index for it in items] == list(range(6))
    ok = [it.record for it in items if it.record]
    assert [r.id for r in ok] == ["19-198-0000", "19-198-0001", "26-495-0000", "26-495-0001"]
    assert ok[0].audio == ["19/198/19-198-0000.flac"]
    assert ok[0].conversations[1].value == "WORDS OF 19-198-0000"
    assert items[2].error.reason == "missing_text"
    assert items[2].lineage == "19/198/19-198.trans.txt:line 3"


def test_start_skips_parsing_but_keeps_indices(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([caption(i, "a.jpg") for i in range(5)]))
    items = list(read_source(source(tmp_path, name="s", kind="caption", format="llava",
                                    path="d.json"), start=3))
    assert [it.index for it in items] == [0, 1, 2, 3, 4]
    assert [it.record is not None for it in items] == [False, False, False, True, True]
