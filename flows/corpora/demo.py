"""The demo corpus: a small sample of every supported input format, generated in code.

Images are drawn with Pillow, videos are H.264 mp4 clips encoded by the ffmpeg binary that
imageio-ffmpeg ships, and the speech clips are spoken by espeak-ng and written as FLAC.
A few inputs are broken on purpose (a path escaping the media root, a missing file, a
truncated JPEG, a malformed JSON element and JSONL line, invalid UTF-8) so that the report
shows what rejects look like.

The layouts datasets ship in (issue 27) each get a small source with one broken input:
parquet with JPEG bytes in its rows (LLaVA-style: a corrupt JPEG; SynDOG-style: a ground
truth with no text), an img2dataset WebDataset tar (a sample with no caption), messages JSONL
with content parts (a tool turn), and an AISHELL-style folder (a transcript line whose wav is
missing).
"""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import soundfile as sf
import yaml
from PIL import Image, ImageDraw

CAPTIONS = [
    ("A red square on a white background with a blue circle to its right.", (448, 448)),
    ("A wide banner with green stripes and a yellow sun in the corner.", (1920, 1080)),
    ("A tall narrow poster with three orange bars stacked vertically.", (300, 1000)),
    ("A landscape photo-like gradient from teal to purple with a grey rectangle.", (640, 480)),
    ("A panorama of alternating black and white columns.", (1000, 500)),
    ("白色背景上有一个红色的正方形和一个蓝色的圆形。", (634, 634)),
]
TEXT_QA = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Name three primary colours.", "Red, yellow and blue are the traditional primary colours."),
    ("中国的首都是哪里？", "中国的首都是北京。"),
    ("How many legs does a spider have?", "A spider has eight legs."),
]
SPEECH = [
    ("spk1-0001", "hello world this is a test"),
    ("spk1-0002", "the quick brown fox jumps over the lazy dog"),
    ("spk2-0001", "今天天气很好"),
]


def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def make_image(path: Path, size: tuple[int, int], seed: int, text: str | None = None) -> None:
    rng = np.random.default_rng(seed)
    w, h = size
    im = Image.new("RGB", size, tuple(int(c) for c in rng.integers(120, 255, 3)))
    d = ImageDraw.Draw(im)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(10, max(11, w // 2))), y0 + int(rng.integers(10, max(11, h // 2)))
        d.rectangle([x0, y0, x1, y1], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    if text:
        d.text((10, h // 2), text, fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".png":
        im.save(path)
    else:
        im.save(path, quality=90)


def make_video(path: Path, seconds: float, size: str = "320x240", fps: int = 25,
               pattern: str = "testsrc") -> None:
    """An H.264 mp4 (yuv420p, faststart) of one of ffmpeg's test patterns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi",
           "-i", f"{pattern}=duration={seconds}:size={size}:rate={fps}",
           "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
           "-movflags", "+faststart", str(path)]
    subprocess.run(cmd, check=True, capture_output=True)


def speech(text: str, voice_index: int = 0, sr: int = 16000) -> np.ndarray:
    """`text` spoken by espeak-ng (English or Mandarin by its script), at `sr`."""
    from schemas.text import detect_language
    from transforms.audio import resample
    from transforms.tts import EspeakBackend

    backend = EspeakBackend()
    voices = backend.voices(detect_language(text))
    wav = backend.synthesize(text, voices[voice_index % len(voices)])
    return resample(wav, backend.sample_rate, sr)


def make_demo_inputs(root: Path, shipped: bool = True) -> Path:
    """Write the demo inputs under `root`; return the corpus config's path. `shipped=False`
    leaves out the sources in the layouts datasets ship in (`shipped_layouts`)."""
    img = root / "media" / "images"
    for i, (_, size) in enumerate(CAPTIONS):
        make_image(img / f"cap_{i:02d}.jpg", size, seed=i)
    make_image(img / "alpha.png", (500, 400), seed=99)
    truncated = (img / "cap_00.jpg").read_bytes()
    (img / "truncated.jpg").write_bytes(truncated[: len(truncated) // 2])

    caption = [{"id": f"cap_{i:02d}", "image": f"images/cap_{i:02d}.jpg",
                "conversations": [{"from": "human", "value": "<image>\nDescribe the image briefly."},
                                  {"from": "gpt", "value": text}]}
               for i, (text, _) in enumerate(CAPTIONS)]
    caption.append({"id": "cap_escape", "image": "../../etc/passwd", "conversations": [
        {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "x"}]})
    caption.append({"id": "cap_missing", "image": "images/nope.jpg", "conversations": [
        {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "x"}]})
    caption.append({"id": "cap_truncated", "image": "images/truncated.jpg", "conversations": [
        {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "x"}]})
    body = json.dumps(caption, ensure_ascii=False, indent=1)
    # One malformed element in the middle of the array: a missing comma between two keys.
    body = body[:-1].rstrip() + ',\n {"id": "cap_broken" "conversations": []}\n]'
    (root / "caption_llava.json").write_text(body, encoding="utf-8")

    qa = [{"set": "demo_vqa", "id": "vqa_0", "image": ["images/cap_00.jpg", "images/alpha.png"],
           "conversations": [
               {"from": "human", "value": "<image>\n<image>\nWhich image has a circle?"},
               {"from": "gpt", "value": "The first image has a blue circle."},
               {"from": "human", "value": "What colour is the square?"},
               {"from": "gpt", "value": "It is red."}]},
          {"set": "demo_vqa", "id": "vqa_1", "image": "images/cap_03.jpg",
           "conversations": [{"from": "human", "value": "How many grey rectangles are there?"},
                             {"from": "gpt", "value": "One."}]}]  # placeholder missing: rejected
    (root / "qa_vita.json").write_text(json.dumps(qa, ensure_ascii=False), encoding="utf-8")

    lines = []
    for i, word in enumerate(["STOP", "EXIT 12", "OPEN 24H"]):
        make_image(img / f"ocr_{i}.png", (480, 200), seed=50 + i, text=word)
        lines.append(json.dumps({"id": f"ocr_{i}", "image": f"images/ocr_{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat does the sign say?"},
            {"from": "gpt", "value": word}]}))
    latin1 = b'{"id": "ocr_bad", "conversations": [{"from": "human", "value": "caf\xe9"}]}\n'
    ocr = ("\n".join(lines) + "\n").encode() + latin1  # a Latin-1 line: invalid UTF-8
    (root / "ocr_llava.jsonl").write_bytes(ocr)

    vids = []
    for i, secs in enumerate([2.5, 8, 20]):
        make_video(root / "media" / "videos" / f"clip_{i}.mp4", secs)
        vids.append({"id": f"vid_{i}", "video": f"videos/clip_{i}.mp4", "conversations": [
            {"from": "human", "value": "<video>\nWhat is shown in the video?"},
            {"from": "gpt", "value": f"A {secs} second test pattern with a moving counter."}]})
    (root / "video_llava.json").write_text(json.dumps(vids), encoding="utf-8")

    text = [{"id": f"txt_{i}", "conversations": [{"from": "human", "value": q},
                                                  {"from": "gpt", "value": a}]}
            for i, (q, a) in enumerate(TEXT_QA)]
    (root / "text_llava.json").write_text(json.dumps(text, ensure_ascii=False), encoding="utf-8")

    asr_lines = []
    (root / "media" / "audio").mkdir(parents=True, exist_ok=True)
    for i, (utt, sentence) in enumerate(SPEECH):
        sf.write(root / "media" / "audio" / f"{utt}.flac", speech(sentence, i), 16000)
        asr_lines.append(json.dumps({"audio": f"audio/{utt}.flac", "text": sentence},
                                    ensure_ascii=False))
    asr_lines.append('{"audio": "audio/spk1-0001.flac", "text": ')  # a cut-off line
    (root / "asr.jsonl").write_text("\n".join(asr_lines) + "\n", encoding="utf-8")

    ls = root / "librispeech" / "19" / "198"
    ls.mkdir(parents=True, exist_ok=True)
    trans = []
    for i, sentence in enumerate(["NORTHANGER ABBEY", "CHAPTER ONE", "NO ONE WHO HAD EVER SEEN"]):
        utt = f"19-198-{i:04d}"
        sf.write(ls / f"{utt}.flac", speech(sentence.lower(), i), 16000)
        trans.append(f"{utt} {sentence}")
    (ls / "19-198.trans.txt").write_text("\n".join(trans) + "\n", encoding="utf-8")

    config = {
        "name": "demo",
        "seed": 1234,
        "shard": {"max_samples": 4, "max_bytes": 64 * 2**20},
        "transforms": {"speech": {"enabled": True, "fraction": 0.5}},
        "sources": [
            {"name": "demo_caption", "kind": "caption", "format": "llava",
             "path": "caption_llava.json", "media_root": "media", "licence": "CC0-1.0"},
            {"name": "demo_vqa", "kind": "qa", "format": "vita",
             "path": "qa_vita.json", "media_root": "media"},
            {"name": "demo_ocr", "kind": "ocr", "format": "llava",
             "path": "ocr_llava.jsonl", "media_root": "media"},
            {"name": "demo_video", "kind": "video", "format": "llava",
             "path": "video_llava.json", "media_root": "media"},
            {"name": "demo_text", "kind": "text", "format": "llava", "path": "text_llava.json"},
            {"name": "demo_asr", "kind": "asr", "format": "asr_jsonl",
             "path": "asr.jsonl", "media_root": "media"},
            {"name": "demo_librispeech", "kind": "asr", "format": "librispeech",
             "path": "librispeech", "language": "en"},
        ],
    }
    (root / "pairs.txt").write_text(
        "Good morning, the weather is lovely today.\nPlease close the door.\n你好，很高兴认识你。\n",
        encoding="utf-8")
    config["sources"].append({"name": "demo_pairs", "kind": "tts_pair", "format": "text_lines",
                              "path": "pairs.txt"})
    if shipped:
        config["sources"] += shipped_layouts(root)
    cfg_path = root / "corpus.yaml"
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return cfg_path


def _jpeg(size: tuple[int, int], seed: int, text: str | None = None) -> bytes:
    """A JPEG drawn in memory (parquet and tar sources hold the bytes, not files)."""
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", size, tuple(int(c) for c in rng.integers(120, 255, 3)))
    d = ImageDraw.Draw(im)
    d.rectangle([size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2],
                fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    if text:
        d.text((10, size[1] // 2), text, fill=(0, 0, 0))
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def shipped_layouts(root: Path) -> list[dict]:
    """The sources in the layouts datasets ship in, written under `root`; their configs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    img = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pqdir = root / "parquet"
    pqdir.mkdir(parents=True, exist_ok=True)
    # LLaVA-OneVision-style: id, image as an HF {bytes, path} struct, conversations as JSON;
    # 5 rows in row groups of 3, so the demo's range of 4 inputs ends inside a row group.
    questions = [("What shape is in the corner?", "A filled rectangle."),
                 ("What is the background colour?", "A light, pale colour."),
                 ("这张图片里有什么？", "一个矩形。"),
                 ("Is there any text?", "No, there is no text."),
                 ("What is shown?", "A broken file.")]
    cells = [{"bytes": _jpeg(size, 200 + i), "path": f"ov_{i}.jpg"}
             for i, size in enumerate([(640, 480), (448, 448), (1000, 500), (300, 1000)])]
    cells.append({"bytes": b"\xff\xd8\xff not a JPEG after all", "path": "ov_bad.jpg"})
    pq.write_table(pa.table({
        "id": [f"ov_{i}" for i in range(len(cells))],
        "image": pa.array(cells, img),
        "conversations": [json.dumps([{"from": "human", "value": f"<image>\n{q}"},
                                      {"from": "gpt", "value": a}], ensure_ascii=False)
                          for q, a in questions]}),
        pqdir / "onevision-00000-of-00001.parquet", row_group_size=3)
    # SynthDoG-style: image and a ground_truth JSON string; one with no text_sequence.
    docs = ["INVOICE 2024-117 TOTAL 42.00", "MEETING AT NOON IN ROOM 4"]
    gts = [json.dumps({"gt_parse": {"text_sequence": t}}) for t in docs] + ['{"gt_parse": {}}']
    pq.write_table(pa.table({
        "image": pa.array([{"bytes": _jpeg((800, 600), 300 + i, text), "path": None}
                           for i, text in enumerate(docs + ["(blank)"])], img),
        "ground_truth": gts}), pqdir / "syndog-00000.parquet")

    # img2dataset's layout: KEY.jpg, KEY.txt, KEY.json in a tar; one sample has no caption.
    wds_dir = root / "webdataset"
    wds_dir.mkdir(parents=True, exist_ok=True)
    members = []
    for i, text in enumerate(["a pale square with a darker block", "a wide grey banner",
                              "a narrow tall picture", None]):
        key = f"{i:09d}"
        members.append((f"{key}.jpg", _jpeg([(500, 375), (1280, 640), (400, 900),
                                             (320, 240)][i], 400 + i)))
        if text is not None:
            members.append((f"{key}.txt", text.encode()))
        members.append((f"{key}.json", json.dumps({"key": key, "status": "success",
                                                   "url": f"https://example.org/{key}.jpg"
                                                   }).encode()))
    with tarfile.open(wds_dir / "00000.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))

    # OpenAI-style messages with content parts; the images are the demo's own files.
    chats = [
        {"id": "chat_0", "messages": [
            {"role": "system", "content": "Answer in one sentence."},
            {"role": "user", "content": [{"type": "image", "image": "images/cap_03.jpg"},
                                         {"type": "text", "text": "What colours do you see?"}]},
            {"role": "assistant", "content": [{"type": "text",
                                               "text": "Teal, purple and grey."}]}]},
        {"id": "chat_1", "images": ["images/cap_05.jpg"], "messages": [
            {"role": "user", "content": [{"type": "image"},
                                         {"type": "text", "text": "图中有什么形状？"}]},
            {"role": "assistant", "content": "一个正方形和一个圆形。"}]},
        {"id": "chat_2", "messages": [
            {"role": "user", "content": "How many sides does a square have?"},
            {"role": "assistant", "content": "Four."}]},
        {"id": "chat_tool", "messages": [  # no VITA form: rejected as unsupported_role
            {"role": "user", "content": "What is the weather?"},
            {"role": "assistant", "content": None,
             "tool_calls": [{"id": "1", "type": "function"}]},
            {"role": "tool", "content": "sunny"}]},
    ]
    (root / "messages.jsonl").write_text(
        "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in chats), encoding="utf-8")

    # AISHELL's layout: transcript/aishell_transcript_v0.8.txt of `id text` (words spaced)
    # beside wav/<split>/<speaker>/<id>.wav; the third line's wav is missing.
    ai = root / "data_aishell"
    lines = [("BAC009S0002W0122", "今天 天气 很 好"), ("BAC009S0002W0123", "我们 去 公园 散步"),
             ("BAC009S0724W0121", "这个 文件 不见 了")]
    for i, (utt, text) in enumerate(lines[:2]):
        wav = ai / "wav" / "train" / utt[6:11] / f"{utt}.wav"
        wav.parent.mkdir(parents=True, exist_ok=True)
        sf.write(wav, speech(text.replace(" ", ""), i), 16000, subtype="PCM_16")
    (ai / "transcript").mkdir(parents=True, exist_ok=True)
    (ai / "transcript" / "aishell_transcript_v0.8.txt").write_text(
        "".join(f"{u} {t}\n" for u, t in lines), encoding="utf-8")

    return [
        {"name": "demo_parquet_llava", "kind": "qa", "format": "parquet", "preset": "llava",
         "path": "parquet/onevision-*.parquet"},
        {"name": "demo_parquet_syndog", "kind": "ocr", "format": "parquet", "preset": "syndog",
         "path": "parquet/syndog-00000.parquet", "ocr_prompt": "Read all the text in the image."},
        {"name": "demo_webdataset", "kind": "caption", "format": "webdataset",
         "path": "webdataset/{00000..00000}.tar", "prompt_seed": 7},
        {"name": "demo_messages", "kind": "qa", "format": "messages", "path": "messages.jsonl",
         "media_root": "media"},
        {"name": "demo_aishell", "kind": "asr", "format": "aishell", "path": "data_aishell",
         "language": "zh"},
    ]
