"""The layouts datasets ship in (issue 27): messages JSONL, AISHELL folders, parquet with the
media in its rows, WebDataset tars. Every file made here, with real encoded media; each build's
accounting, ids, placeholders, tiles, audio rate and reject reasons checked."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf
import webdataset as wds
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from flows.build.pipeline import build
from schemas.config import config_from_dict, load_config
from schemas.rejects import REASONS
from storage.read_webdataset import prompt_choice
from storage.readers import read_source

from conftest import tars, write_flac, write_image

IMG = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
AUDIO = pa.struct([("bytes", pa.binary()), ("path", pa.string()), ("sampling_rate", pa.int64())])


def jpeg(size: tuple[int, int], seed: int) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def wav(seconds: float, sr: int, seed: int = 0) -> bytes:
    t = np.arange(int(seconds * sr)) / sr
    buf = io.BytesIO()
    sf.write(buf, 0.3 * np.sin(2 * np.pi * (220 + 40 * seed) * t), sr, format="WAV")
    return buf.getvalue()


def run(root: Path, sources: list[dict], max_samples: int = 1000, executor=None) -> dict:
    cfg_path = root / "corpus.yaml"
    cfg_path.write_text(yaml.safe_dump({"shard": {"max_samples": max_samples},
                                        "sources": sources}))
    return build(load_config(cfg_path), str(root / "out"), executor=executor)


def samples(out: Path) -> dict[str, dict]:
    found = {}
    for tar in sorted((out / "ingest").glob("*.tar")):
        for s in wds.WebDataset(str(tar), shardshuffle=False):
            found[json.loads(s["json"])["id"]] = s
    return found


def rejects(out: Path) -> dict[str, str]:
    return {r.get("id") or r["lineage"]: r["reason"] for f in (out / "rejects").glob("*.jsonl")
            for r in map(json.loads, f.read_text().splitlines())}


def test_messages_jsonl_with_content_parts(tmp_path):
    write_image(tmp_path / "imgs/a.jpg", (640, 480))
    write_image(tmp_path / "imgs/b.jpg", (448, 448), seed=1)
    rows = [
        {"id": "m1", "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "image", "image": "imgs/a.jpg"},
                                         {"type": "text", "text": "What is shown?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Noise."}]},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "imgs/b.jpg"}},
                                         {"type": "text", "text": "And here?"}]},
            {"role": "assistant", "content": "More noise."}]},
        {"id": "m2", "images": ["imgs/b.jpg"], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "这是什么？"}]},
            {"role": "assistant", "content": "噪声。"}]},
        {"id": "tool", "messages": [{"role": "user", "content": "weather?"},
                                    {"role": "assistant", "content": None,
                                     "tool_calls": [{"id": "1", "type": "function"}]},
                                    {"role": "tool", "content": "sunny"}]},
        {"id": "nofile", "messages": [{"role": "user", "content": [{"type": "image"}]},
                                      {"role": "assistant", "content": "?"}]},
        {"id": "url", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.invalid/x.jpg"}}]},
            {"role": "assistant", "content": "?"}]},
        {"id": "late_system", "messages": [{"role": "user", "content": "hi"},
                                           {"role": "system", "content": "be nice"},
                                           {"role": "assistant", "content": "hello"}]},
    ]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False)
                                                   for r in rows) + "\n")
    report = run(tmp_path, [{"name": "chat", "kind": "qa", "format": "messages",
                             "path": "chat.jsonl"}])
    src = report["sources"]["chat"]
    assert (src["inputs"], src["written"], src["rejected"]) == (6, 2, 4)
    assert rejects(tmp_path / "out") == {"tool": "unsupported_role",
                                         "nofile": "media_part_without_file",
                                         "url": "unmappable_content",
                                         "late_system": "unmappable_content"}
    got = samples(tmp_path / "out")
    m1 = json.loads(got["m1"]["json"])
    assert m1["image"] == ["imgs/a.jpg", "imgs/b.jpg"]
    assert [t["value"] for t in m1["conversations"]] == [
        "<image>\nWhat is shown?", "Noise.", "<image>\nAnd here?", "More noise."]
    assert m1["meta"]["system"] == "Answer briefly."
    # 640x480 -> (4, 3) grid + thumbnail = 13 tiles, then 448x448 -> 1 tile
    assert [i["tiles"] for i in m1["meta"]["tiling"]["images"]] == [13, 1]
    assert sum(k.startswith("tile_") for k in got["m1"]) == 14
    m2 = json.loads(got["m2"]["json"])
    assert m2["image"] == "imgs/b.jpg" and m2["meta"]["language"] == "zh"
    assert m2["conversations"][0]["value"] == "<image>\n这是什么？"


_PART = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, st.text(max_size=8)),
    st.sampled_from([{"type": "image"}, {"type": "image", "image": "a.jpg"},
                     {"type": "video", "video": "v.mp4"}, {"type": "audio"},
                     {"type": "input_audio", "input_audio": {"data": "AAAA"}},
                     {"type": "weird"}, {"type": "image_url", "image_url": {"url": "data:x"}}]))
_MSG = st.builds(lambda role, content: {"role": role, "content": content},
                 st.sampled_from(["user", "assistant", "system", "tool", "developer"]),
                 st.one_of(st.none(), st.text(max_size=10), st.lists(_PART, max_size=3)))


@settings(max_examples=150, deadline=None)
@given(st.lists(_MSG, max_size=5), st.lists(st.just("p.jpg"), max_size=2))
def test_messages_become_a_record_or_a_named_reason(tmp_path_factory, messages, images):
    root = tmp_path_factory.mktemp("msg")
    (root / "m.jsonl").write_text(json.dumps({"messages": messages, "images": images}) + "\n")
    cfg = config_from_dict({"sources": [{"name": "m", "kind": "qa", "format": "messages",
                                         "path": "m.jsonl"}]}, base=root)
    (item,) = read_source(cfg.sources[0])
    assert (item.record is None) != (item.error is None)
    if item.error is not None:
        assert item.error.reason in REASONS and item.error.reason != "internal_error"
    else:
        rec = item.record
        assert [t.from_ for t in rec.conversations][::2] == ["human"] * len(rec.conversations[::2])
        counts = rec.placeholder_counts()
        assert all(counts[k] == len(v) for k, v in rec.media().items())


def test_aishell_folder_with_a_missing_wav(tmp_path):
    root = tmp_path / "data_aishell"
    write_flac(root / "wav/train/S0002/BAC009S0002W0122.wav", 1.0, sr=16000)
    wav_path = root / "wav/dev/S0724/BAC009S0724W0121.wav"
    wav_path.parent.mkdir(parents=True)
    wav_path.write_bytes(wav(1.5, 44100))
    (root / "transcript").mkdir()
    (root / "transcript/aishell_transcript_v0.8.txt").write_text(
        "BAC009S0002W0122 而 对 楼市 成交 抑制 作用 最 大 的 限 购\n"
        "BAC009S0724W0121 甚至 出现 交易 几乎 停滞 的 情况\n"
        "BAC009S0764W0143 一 二线 城市 虽然 也 处于 调整 中\n", encoding="utf-8")
    report = run(tmp_path, [{"name": "aishell", "kind": "asr", "format": "aishell",
                             "path": "data_aishell", "language": "zh"}])
    src = report["sources"]["aishell"]
    assert (src["inputs"], src["written"], src["reject_reasons"]) == (3, 2, {"missing_media": 1})
    assert rejects(tmp_path / "out") == {"BAC009S0764W0143": "missing_media"}
    got = samples(tmp_path / "out")
    rec = json.loads(got["BAC009S0724W0121"]["json"])
    assert rec["conversations"][1]["value"] == "甚至 出现 交易 几乎 停滞 的 情况"  # kept as is
    assert rec["audio"] == ["wav/dev/S0724/BAC009S0724W0121.wav"]
    assert rec["meta"]["lineage"] == "transcript/aishell_transcript_v0.8.txt:line 2"
    assert sf.info(io.BytesIO(got["BAC009S0724W0121"]["audio_00.flac"])).samplerate == 16000


def test_transcript_dir_needs_its_transcript_named(tmp_path):
    try:
        config_from_dict({"sources": [{"name": "t", "kind": "asr", "format": "transcript_dir",
                                       "path": "."}]}, base=tmp_path)
    except ValueError as err:
        assert "needs `transcript`" in str(err)
    else:
        raise AssertionError("a transcript_dir source without `transcript` was accepted")


def llava_parquet(path: Path, prefix: str = "r") -> None:
    """Six rows in row groups of 2: bytes structs, a list of two images, a null cell, a corrupt
    image, a text-only row, and a path-only struct."""
    cells = [{"bytes": jpeg((640, 480), 0), "path": "a.jpg"},
             [{"bytes": jpeg((448, 448), 1), "path": None}, {"bytes": jpeg((1000, 500), 2),
                                                             "path": None}],
             None, {"bytes": b"\xff\xd8 not a jpeg", "path": "bad.jpg"}, None,
             {"bytes": None, "path": "disk.jpg"}]
    turns = [[{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A."}],
             [{"from": "human", "value": "<image>\n<image>\nCompare."},
              {"from": "gpt", "value": "B."}],
             [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "C."}],
             [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "D."}],
             [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "E."}],
             [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "F."}]]
    img_type = pa.list_(IMG)
    table = pa.table({"id": [f"{prefix}{i}" for i in range(6)],
                      "image": pa.array([c if c is None or isinstance(c, list) else [c]
                                         for c in cells], img_type),
                      "conversations": [json.dumps(t) for t in turns]})
    pq.write_table(table, path, row_group_size=2)


def test_parquet_llava_preset(tmp_path, ray_executor):
    (tmp_path / "data").mkdir()
    llava_parquet(tmp_path / "data/train-00000.parquet")
    write_image(tmp_path / "data/disk.jpg", (448, 448))
    source = {"name": "ov", "kind": "qa", "format": "parquet", "path": "data"}
    report = run(tmp_path, [source], max_samples=3)  # a range holds rows of two row groups
    src = report["sources"]["ov"]
    assert (src["inputs"], src["written"], src["rejected"]) == (6, 4, 2)
    assert rejects(tmp_path / "out") == {"r2": "null_media", "r3": "image_decode_error"}
    got = samples(tmp_path / "out")
    r1 = json.loads(got["r1"]["json"])
    assert r1["image"] == ["parquet:train-00000.parquet#rg0/row1/image/0",
                           "parquet:train-00000.parquet#rg0/row1/image/1"]
    assert [i["tiles"] for i in r1["meta"]["tiling"]["images"]] == [1, 3]
    assert r1["meta"]["lineage"] == "train-00000.parquet:row group 0, row 1"
    assert json.loads(got["r0"]["json"])["meta"]["tiling"]["images"][0]["grid"] == [4, 3]
    assert "image" not in json.loads(got["r4"]["json"])  # text-only
    assert json.loads(got["r5"]["json"])["image"] == "disk.jpg"  # a path-only struct
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [
        "disk.jpg", "train-00000.parquet"]  # nothing written beside the source
    # The same bytes from Ray workers, which read the rows again by row group.
    first = tars(tmp_path / "out")
    (tmp_path / "corpus.yaml").rename(tmp_path / "corpus.yaml.bak")
    ray_root = tmp_path / "ray"
    ray_root.mkdir()
    (ray_root / "data").symlink_to(tmp_path / "data")
    run(ray_root, [source], max_samples=3, executor=ray_executor)
    assert tars(ray_root / "out") == first


def test_parquet_grown_source_builds_only_the_new_file(tmp_path):
    (tmp_path / "data").mkdir()
    llava_parquet(tmp_path / "data/train-00000.parquet")
    write_image(tmp_path / "data/disk.jpg", (448, 448))
    source = {"name": "ov", "kind": "qa", "format": "parquet", "path": "data/*.parquet"}
    run(tmp_path, [source], max_samples=3)
    llava_parquet(tmp_path / "data/train-00001.parquet", prefix="s")
    report = run(tmp_path, [source], max_samples=3)
    src = report["sources"]["ov"]
    assert (src["inputs"], src["written"], src["parts_reused"]) == (12, 8, 2)


def test_parquet_cauldron_syndog_and_hf_audio_presets(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    pq.write_table(pa.table({
        "images": pa.array([[{"bytes": jpeg((300, 1000), 3), "path": None}],
                            [{"bytes": jpeg((448, 448), 4), "path": None},
                             {"bytes": jpeg((634, 634), 5), "path": None}],
                            []], pa.list_(IMG)),
        "texts": [[{"user": "Read it.", "assistant": "Text.", "source": "x"}],
                  [{"user": "Which is bigger?", "assistant": "The second."},
                   {"user": "Sure?", "assistant": "Yes."}],
                  [{"user": "Nothing?", "assistant": "No."}]]}), d / "cauldron.parquet")
    gt = json.dumps({"gt_parse": {"text_sequence": "Invoice 42"}})
    pq.write_table(pa.table({"image": pa.array([{"bytes": jpeg((1920, 1080), 6), "path": None},
                                                {"bytes": jpeg((64, 64), 7), "path": None}], IMG),
                             "ground_truth": [gt, "{}"]}), d / "syndog.parquet")
    pq.write_table(pa.table({"audio": pa.array([
        {"bytes": wav(1.2, 48000), "path": "clip0.wav", "sampling_rate": 48000},
        {"bytes": wav(0.1, 16000, 1), "path": "short.wav", "sampling_rate": 16000},
        None], AUDIO), "sentence": ["你好世界", "short", "gone"]}), d / "audio.parquet")
    report = run(tmp_path, [
        {"name": "cauldron", "kind": "qa", "format": "parquet", "preset": "cauldron",
         "path": "d/cauldron.parquet"},
        {"name": "syndog", "kind": "ocr", "format": "parquet", "preset": "syndog",
         "path": "d/syndog.parquet", "ocr_prompt": "Read the document."},
        {"name": "speech", "kind": "asr", "format": "parquet", "path": "d/audio.parquet"}])
    rep = report["sources"]
    assert rep["cauldron"]["reject_reasons"] == {"null_media": 1}
    assert rep["syndog"]["reject_reasons"] == {"missing_text": 1}
    assert rep["speech"]["reject_reasons"] == {"audio_too_short": 1, "null_media": 1}
    assert all(s["inputs"] == s["written"] + s["rejected"] for s in rep.values())
    got = samples(tmp_path / "out")
    c1 = json.loads(got["cauldron_00000001"]["json"])
    assert [t["value"] for t in c1["conversations"]] == [
        "<image>\n<image>\nWhich is bigger?", "The second.", "Sure?", "Yes."]
    assert [i["tiles"] for i in c1["meta"]["tiling"]["images"]] == [1, 5]
    c0 = json.loads(got["cauldron_00000000"]["json"])
    assert c0["image"] == ["parquet:cauldron.parquet#rg0/row0/images/0"]
    assert c0["meta"]["tiling"]["images"][0]["grid"] == [1, 3]
    s0 = json.loads(got["syndog_00000000"]["json"])
    assert s0["conversations"] == [{"from": "human", "value": "<image>\nRead the document."},
                                   {"from": "gpt", "value": "Invoice 42"}]
    assert s0["meta"]["task"] == "ocr" and s0["meta"]["tiling"]["images"][0]["tiles"] == 9
    a0 = json.loads(got["speech_00000000"]["json"])
    assert a0["conversations"][1]["value"] == "你好世界" and a0["meta"]["language"] == "zh"
    assert sf.info(io.BytesIO(got["speech_00000000"]["audio_00.flac"])).samplerate == 16000


def test_parquet_missing_column_and_corrupt_file_are_rejected_per_row(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    pq.write_table(pa.table({"id": ["a", "b", "c"], "caption": ["x", "y", "z"]}),
                   d / "a.parquet", row_group_size=2)
    (d / "b.parquet").write_bytes(b"PAR1 this is no parquet file PAR1")
    cfg = config_from_dict({"sources": [{"name": "p", "kind": "qa", "format": "parquet",
                                         "path": "d"}]}, base=tmp_path)
    items = list(read_source(cfg.sources[0]))
    assert [(i.index, i.error.reason) for i in items] == [
        (0, "missing_column"), (1, "missing_column"), (2, "missing_column"), (3, "bad_container")]
    assert items[2].lineage == "a.parquet:row group 1, row 0"


def test_webdataset_img2dataset_layout(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    with wds.TarWriter(str(shards / "00000.tar")) as w:
        w.write({"__key__": "000000000", "jpg": jpeg((640, 480), 0), "txt": "a red square",
                 "json": json.dumps({"url": "u0", "caption": "ignored"})})
        w.write({"__key__": "000000001", "png": _png(), "json": json.dumps({"caption": "a dot"})})
    with wds.TarWriter(str(shards / "00001.tar")) as w:
        w.write({"__key__": "000010000", "jpg": jpeg((448, 448), 1)})  # no caption
        w.write({"__key__": "000010001", "txt": "no image"})
        w.write({"__key__": "000010002", "webp": _webp(), "txt": "a webp"})
    prompts = ["Describe it.", "What is in the picture?", "Caption this."]
    report = run(tmp_path, [{"name": "laion", "kind": "caption", "format": "webdataset",
                             "path": "shards/{00000..00001}.tar", "prompts": prompts,
                             "prompt_seed": 7}])
    src = report["sources"]["laion"]
    assert (src["inputs"], src["written"]) == (5, 3)
    assert src["reject_reasons"] == {"missing_media": 1, "missing_text": 1}
    got = samples(tmp_path / "out")
    cfg = load_config(tmp_path / "corpus.yaml").sources[0]
    for key, caption in [("000000000", "a red square"), ("000000001", "a dot"),
                         ("000010002", "a webp")]:
        rec = json.loads(got[key]["json"])
        choice = prompt_choice(cfg, key)
        assert rec["meta"]["prompt"] == {"index": choice, "seed": 7}
        assert rec["conversations"] == [{"from": "human", "value": f"<image>\n{prompts[choice]}"},
                                        {"from": "gpt", "value": caption}]
        assert rec["image"].startswith("tar:0000")
    assert len({prompt_choice(cfg, f"k{i}") for i in range(30)}) == 3  # every prompt is used
    assert json.loads(got["000000000"]["json"])["meta"]["tiling"]["images"][0]["grid"] == [4, 3]


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (100, 80), (0, 0, 255)).save(buf, "PNG")
    return buf.getvalue()


def _webp() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (120, 90), (0, 255, 0)).save(buf, "WEBP")
    return buf.getvalue()


def test_webdataset_hostile_members_and_a_truncated_tar(tmp_path):
    import tarfile

    shards = tmp_path / "s"
    shards.mkdir()
    with tarfile.open(shards / "a.tar", "w") as tar:
        for name, data in [("k1.jpg", jpeg((64, 64), 0)), ("k1.txt", b"ok")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("k2.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        info = tarfile.TarInfo("k2.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"no"))
    with wds.TarWriter(str(shards / "b.tar")) as w:
        w.write({"__key__": "k3", "jpg": jpeg((64, 64), 1), "txt": "fine"})
        w.write({"__key__": "k4", "jpg": jpeg((256, 256), 2), "txt": "cut"})
    whole = (shards / "b.tar").read_bytes()
    (shards / "b.tar").write_bytes(whole[: len(whole) // 2 + 700])  # inside k4's image
    cfg = config_from_dict({"sources": [{"name": "w", "kind": "caption", "format": "webdataset",
                                         "path": "s"}]}, base=tmp_path)
    items = list(read_source(cfg.sources[0]))
    assert [(i.record_id, i.error.reason if i.error else None) for i in items] == [
        ("k1", None), ("k2", "not_a_file"), ("k3", None), ("k4", "bad_container")]


def test_references_stay_inside_the_data_root(tmp_path):
    from schemas.rejects import Rejected
    from storage.embedded import EmbeddedMedia

    (tmp_path / "root").mkdir()
    llava_parquet(tmp_path / "outside.parquet")
    reader = EmbeddedMedia(str(tmp_path / "root"))
    for ref in ("parquet:../outside.parquet#rg0/row0/image/0", "tar:/etc/passwd#off0+10"):
        try:
            reader.read(ref, "image")
        except Rejected as err:
            assert err.reason == "path_outside_root"
        else:
            raise AssertionError(f"{ref} was read")


def test_parquet_row_group_over_the_limit_rejects_its_rows(tmp_path):
    llava_parquet(tmp_path / "d.parquet")
    cfg = config_from_dict({"limits": {"parquet_max_row_group_mb": 0.01},
                            "sources": [{"name": "p", "kind": "qa", "format": "parquet",
                                         "path": "d.parquet"}]}, base=tmp_path)
    reasons = [i.error.reason if i.error else None
               for i in read_source(cfg.sources[0], limits=cfg.limits)]
    # row group 0 (three random-noise JPEGs) passes 10 kB; the small groups are read
    assert reasons == ["row_group_too_large"] * 2 + ["null_media", None, None, None]


def test_webdataset_over_an_fsspec_url_with_a_brace_pattern(tmp_path):
    import fsspec

    from storage.embedded import EmbeddedMedia
    from storage.readbase import data_root

    fs = fsspec.filesystem("memory")
    for shard, key in (("00000", "a"), ("00001", "b")):
        local = tmp_path / f"{shard}.tar"
        with wds.TarWriter(str(local)) as w:
            w.write({"__key__": key, "jpg": jpeg((64, 64), 0), "txt": f"caption {key}"})
        fs.pipe(f"/w27/shards/{shard}.tar", local.read_bytes())
    cfg = config_from_dict({"sources": [{"name": "r", "kind": "caption", "format": "webdataset",
                                         "path": "memory://w27/shards/{00000..00001}.tar"}]})
    src = cfg.sources[0]
    items = list(read_source(src))
    assert [(i.record_id, i.record.conversations[1].value) for i in items] == [
        ("a", "caption a"), ("b", "caption b")]
    data = EmbeddedMedia(data_root(src)).read(items[1].record.image, "image")
    assert data == jpeg((64, 64), 0)


def test_a_worker_reads_a_rewritten_parquet_file_again(tmp_path):
    from storage.embedded import EmbeddedMedia, parquet_ref

    def write(data: bytes) -> None:
        pq.write_table(pa.table({"image": pa.array([{"bytes": data, "path": None}], IMG)}),
                       tmp_path / "d.parquet")

    reader = EmbeddedMedia(str(tmp_path))
    ref = parquet_ref("d.parquet", 0, 0, "image", None)
    write(jpeg((32, 32), 0))
    assert reader.read(ref, "image") == jpeg((32, 32), 0)
    write(jpeg((48, 48), 1))  # the next build's file, read by the same long-lived worker
    assert reader.read(ref, "image") == jpeg((48, 48), 1)


_CELL = st.sampled_from(["jpeg", "junk", "null", "empty", "path", "list2", "null_elem"])


@settings(max_examples=25, deadline=None)
@given(st.lists(_CELL, min_size=1, max_size=12), st.integers(1, 5))
def test_every_parquet_row_is_one_input(tmp_path_factory, cells, group):
    root = tmp_path_factory.mktemp("pq")
    pic = jpeg((16, 16), 0)
    make = {"jpeg": [{"bytes": pic, "path": None}], "junk": [{"bytes": b"junk", "path": None}],
            "null": None, "empty": [], "path": [{"bytes": None, "path": "x.jpg"}],
            "list2": [{"bytes": pic, "path": None}] * 2, "null_elem": [None]}
    turns = json.dumps([{"from": "human", "value": "<image>\nWhat?"},
                        {"from": "gpt", "value": "It."}])
    pq.write_table(pa.table({"image": pa.array([make[c] for c in cells], pa.list_(IMG)),
                             "conversations": [turns] * len(cells)}),
                   root / "d.parquet", row_group_size=group)
    cfg = config_from_dict({"sources": [{"name": "p", "kind": "qa", "format": "parquet",
                                         "path": "d.parquet"}]}, base=root)
    items = list(read_source(cfg.sources[0]))
    assert [i.index for i in items] == list(range(len(cells)))
    for cell, item in zip(cells, items, strict=True):
        assert (item.record is None) != (item.error is None)
        assert item.lineage == f"d.parquet:row group {item.index // group}, row {item.index % group}"
        expected = {"null": "null_media", "empty": "null_media", "null_elem": "null_media",
                    "list2": "placeholder_mismatch"}.get(cell)
        assert (item.error.reason if item.error else None) == expected


def test_webdataset_video2dataset_layout(tmp_path):
    from conftest import clip

    mp4 = clip(tmp_path / "c.mp4", 2, size="160x120").read_bytes()
    (tmp_path / "v").mkdir()
    with wds.TarWriter(str(tmp_path / "v/00000.tar")) as w:
        w.write({"__key__": "vid0", "mp4": mp4, "txt": "a test pattern",
                 "json": json.dumps({"duration": 2})})
        w.write({"__key__": "vid1", "jpg": jpeg((64, 64), 0), "txt": "no video here"})
    report = run(tmp_path, [{"name": "webvid", "kind": "video", "format": "webdataset",
                             "path": "v/00000.tar"}])
    assert report["sources"]["webvid"]["reject_reasons"] == {"missing_media": 1}
    rec = json.loads(samples(tmp_path / "out")["vid0"]["json"])
    assert rec["video"].startswith("tar:00000.tar#off")
    assert rec["conversations"][0]["value"].startswith("<video>\n")
    assert rec["meta"]["video"]["frames"] == 4  # under 4 s: 4 frames by the paper's rule


def test_source_files_go_through_the_guarded_open(tmp_path):
    import os

    outside = tmp_path / "outside"
    outside.mkdir()
    llava_parquet(outside / "x.parquet")
    (outside / "secret.txt").write_text("ID1 secret\n")
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.parquet").symlink_to(outside / "x.parquet")  # a link out of the source's folder
    os.mkfifo(d / "b.parquet")  # would block a plain open forever
    cfg = config_from_dict({"sources": [{"name": "p", "kind": "qa", "format": "parquet",
                                         "path": "d"}]}, base=tmp_path)
    assert [(i.lineage, i.error.reason) for i in read_source(cfg.sources[0])] == [
        ("a.parquet:file", "path_outside_root"), ("b.parquet:file", "not_a_file")]
    ai = tmp_path / "ai"
    (ai / "transcript").mkdir(parents=True)
    (ai / "transcript/aishell_transcript_v0.8.txt").symlink_to(outside / "secret.txt")
    cfg = config_from_dict({"sources": [{"name": "a", "kind": "asr", "format": "aishell",
                                         "path": "ai"}]}, base=tmp_path)
    (item,) = read_source(cfg.sources[0])
    assert item.error.reason == "path_outside_root" and "secret" not in item.raw
