"""A scale corpus: N records in the real input formats, generated in minutes, for benchmarks.

Mostly text QA and captions of small generated images (a few hundred distinct JPEGs, each
referenced many times), a few percent video QA (a handful of tiny H.264 clips made with the
bundled ffmpeg, reused), ASR pairs (a handful of FLACs, reused) and text-speech pairs; English
and Chinese in every task. A sprinkle of bad inputs shows up as rejects: malformed JSON
elements, missing images, duplicate ids (repeating an id from a few thousand inputs earlier,
so from another range and partition), and a question whose `<image>` placeholder is missing.

Records are written one at a time (a JSON array is streamed element by element), so memory
does not depend on N. Every choice comes from `seed`, so the same (N, seed) gives the same
bytes. The questions of text QA, captions and image QA differ from record to record (a
template filled with the record's number and seeded words), so stage 2.2 synthesizes every
spoken question, as it would on a real QA set; `question_pool=True` (`demo --scale N
--question-pool`) draws them from a pool of about twenty instead, so that a build with a warm
synthesis cache measures everything but the synthesis.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import yaml

from flows.corpora.plant import BENCH_ITEMS, PLANT, benchmark_question, make_variants, reword
from flows.corpora.words import ANIMALS, COLOURS, COUNTRIES, FRUITS, SHAPES

# Fractions of N per source kind; the remainder goes to text QA.
MIX = {"caption": 0.26, "qa": 0.12, "ocr": 0.03, "video": 0.02, "asr": 0.04, "tts_pair": 0.01}
ZH_SHARE = 0.2  # records in Chinese, per task
BAD_EVERY = {"malformed": 1000, "missing": 500, "duplicate": 700, "placeholder": 200}
DUPLICATE_LAG = 650  # a duplicate repeats the id of the record this many earlier

EN_QUESTIONS = ["What is the capital of France?", "How many legs does a spider have?",
                "What colour is a ripe banana?", "Explain why the sky looks blue.",
                "What does a horse eat?", "Give a synonym for happy.",
                "Which ocean borders Japan?", "What is two plus three?",
                "Translate good morning into French.", "Name a famous dish from India."]
ZH_QUESTIONS = ["法国的首都是哪里？", "蜘蛛有几条腿？", "成熟的香蕉是什么颜色？", "为什么天空是蓝色的？",
                "二加三等于多少？"]
ZH_ANIMALS, ZH_FRUITS = ["蜘蛛", "猫", "马", "狗"], ["香蕉", "番茄", "柠檬"]
EN_CAPTION_Q = ["Describe the image briefly.", "What is shown in this picture?",
                "Write a short caption for the image."]
ZH_CAPTION_Q = ["请简要描述这张图片。", "图片里有什么？"]
EN_VQA_Q = ["How many rectangles are there?", "What colour is the largest shape?",
            "Is there anything in the top left corner?"]
ZH_VQA_Q = ["图中有几个长方形？", "最大的形状是什么颜色？"]
ZH_COLOURS = ["红色", "绿色", "蓝色", "橙色", "紫色", "灰色"]
SIGNS = ["STOP", "EXIT 12", "OPEN 24H", "NO PARKING", "PLATFORM 3", "SALE"]
SPEECH = [("hello world this is a test", "en"), ("the quick brown fox jumps over the lazy dog", "en"),
          ("please close the door when you leave", "en"), ("今天天气很好", "zh"),
          ("我们明天见", "zh"), ("good morning everyone", "en")]
PAIRS = ["Good morning, the weather is lovely today.", "Please close the door.",
         "The train leaves at nine.", "Thank you for your help.", "你好，很高兴认识你。",
         "我们明天早上见。"]
VIDEOS = [(2.0, "testsrc2"), (3.0, "smptebars"), (2.5, "rgbtestsrc"), (6.0, "testsrc2")]


def counts(n: int) -> dict[str, int]:
    """Records per source kind for N in total: at least one of each, text QA takes the rest."""
    got = {k: max(1, int(n * f)) for k, f in MIX.items()}
    got["text"] = n - sum(got.values())
    return got


class _ArrayWriter:
    """A JSON array written element by element; `raw` adds an element's text as it is."""

    def __init__(self, f: IO[str]) -> None:
        self.f, self.first = f, True
        f.write("[\n")

    def raw(self, text: str) -> None:
        self.f.write(text if self.first else ",\n" + text)
        self.first = False

    def add(self, obj: dict[str, Any]) -> None:
        self.raw(json.dumps(obj, ensure_ascii=False))

    def close(self) -> None:
        self.f.write("\n]\n")


def _bad(i: int, kind: str) -> bool:
    every = BAD_EVERY[kind]
    return i % every == every - 1


EN_TEMPLATES = ["Question {i}: how many {fruit}s would the {colour} {animal} from {country} eat?",
                "In puzzle {i}, what colour is the {shape} next to the {fruit}?",
                "Explain, for case {i}, why the {animal} in {country} likes {colour} {fruit}s.",
                "Is the {colour} {shape} number {i} bigger than the {animal}?"]
ZH_TEMPLATES = ["第{i}题：{colour}的{animal}吃几个{fruit}？", "在第{i}张图里，{fruit}旁边是什么颜色？",
                "请解释第{i}个例子里{animal}为什么喜欢{colour}的{fruit}。"]


def _question(rng: random.Random, zh: bool, i: int | str | None = None) -> str:
    """A question; with `i` (the record's number) one no other record has."""
    if i is None:
        return rng.choice(ZH_QUESTIONS if zh else EN_QUESTIONS)
    if zh:
        return rng.choice(ZH_TEMPLATES).format(i=i, colour=rng.choice(ZH_COLOURS),
                                               animal=rng.choice(ZH_ANIMALS),
                                               fruit=rng.choice(ZH_FRUITS))
    return rng.choice(EN_TEMPLATES).format(i=i, fruit=rng.choice(FRUITS),
                                           colour=rng.choice(COLOURS),
                                           animal=rng.choice(ANIMALS),
                                           country=rng.choice(COUNTRIES),
                                           shape=rng.choice(SHAPES))


def _answer(rng: random.Random, zh: bool, i: int) -> str:
    if zh:
        return (f"这是第{i}个回答：{rng.choice(ZH_COLOURS)}的{rng.choice(ZH_ANIMALS)}和"
                f"{rng.randint(2, 99)}个{rng.choice(ZH_FRUITS)}。")
    return (f"Answer {i}: a {rng.choice(COLOURS)} {rng.choice(SHAPES)} next to "
            f"{rng.randint(2, 99)} {rng.choice(FRUITS)}s, as seen from {rng.choice(COUNTRIES)}.")


def _text_records(n: int, rng: random.Random, plant: random.Random | None = None,
                  pool: bool = False) -> Iterator[dict[str, Any] | str]:
    for i in range(n):
        if _bad(i, "malformed"):
            yield f'{{"id": "text_{i:08d}" "conversations": []}}'  # a missing comma
            continue
        rid = f"text_{i - DUPLICATE_LAG:08d}" if _bad(i, "duplicate") and i >= DUPLICATE_LAG \
            else f"text_{i:08d}"
        zh = rng.random() < ZH_SHARE
        turns = [{"from": "human", "value": _question(rng, zh, None if pool else 2 * i)},
                 {"from": "gpt", "value": _answer(rng, zh, i)}]
        if rng.random() < 0.3:  # a follow-up turn
            turns += [{"from": "human", "value": _question(rng, zh, None if pool else 2 * i + 1)},
                      {"from": "gpt", "value": _answer(rng, zh, i + 1)}]
        if plant is not None and plant.random() < PLANT["leak"] / 0.5 and not _bad(i, "duplicate"):
            k = plant.randrange(BENCH_ITEMS)
            turns[0]["value"] = benchmark_question(k)
            yield {"id": rid, "conversations": turns, "_planted": ("leak", f"item_{k:05d}")}
            continue
        yield {"id": rid, "conversations": turns}


def _caption_records(n: int, rng: random.Random, images: list[str],
                     variants: dict[str, str] | None = None, plant: random.Random | None = None,
                     pool: bool = False) -> Iterator[dict[str, Any]]:
    for i in range(n):
        zh = rng.random() < ZH_SHARE
        image = f"images/missing_{i}.jpg" if _bad(i, "missing") else rng.choice(images)
        if plant is not None and variants and not _bad(i, "missing") and \
                plant.random() < PLANT["variant"] / 0.26:
            image = plant.choice(sorted(variants))
        q = rng.choice(ZH_CAPTION_Q if zh else EN_CAPTION_Q)
        if not pool:
            q = f"{q[:-1]}，第{i}张。" if zh else f"{q[:-1]}, picture {i}."
        yield {"id": f"cap_{i:08d}", "image": image,
               "conversations": [{"from": "human", "value": f"<image>\n{q}"},
                                 {"from": "gpt", "value": _answer(rng, zh, i)}]}


def _qa_records(n: int, rng: random.Random, images: list[str], pool: bool = False
                ) -> Iterator[dict[str, Any]]:
    for i in range(n):
        zh = rng.random() < ZH_SHARE
        q = rng.choice(ZH_VQA_Q if zh else EN_VQA_Q)
        if not pool:
            q = f"第{i}张图：{q}" if zh else f"In image {i}: {q[0].lower()}{q[1:]}"
        lead = "" if _bad(i, "placeholder") else "<image>\n"  # no placeholder: rejected
        rec: dict[str, Any] = {
            "set": "scale_vqa", "id": f"vqa_{i:08d}", "image": rng.choice(images),
            "conversations": [{"from": "human", "value": f"{lead}{q}"},
                              {"from": "gpt", "value": _answer(rng, zh, i)}]}
        if rng.random() < 0.25:
            follow = _question(rng, zh, None if pool else f"{i}a")
            rec["conversations"] += [{"from": "human", "value": follow},
                                     {"from": "gpt", "value": _answer(rng, zh, i + 1)}]
        yield rec


def make_images(folder: Path, n: int, seed: int) -> tuple[list[str], list[str]]:
    """`n` small JPEGs of flat shapes (mostly square: one tile; some 2:1: three; a few 4:3:
    thirteen) and a few sign images with text; their paths relative to the media root."""
    from flows.corpora.demo import make_image

    rng = random.Random(seed)
    photos, signs = [], []
    for i in range(n):
        r = rng.random()
        side = rng.randrange(192, 449, 32)
        size = (side, side) if r < 0.75 else (2 * side, side) if r < 0.95 else (320, 240)
        make_image(folder / f"img_{i:04d}.jpg", size, seed=seed + i)
        photos.append(f"images/img_{i:04d}.jpg")
    for i, word in enumerate(SIGNS):
        make_image(folder / f"sign_{i}.jpg", (400, 200), seed=seed + 10_000 + i, text=word)
        signs.append(f"images/sign_{i}.jpg")
    return photos, signs


def make_scale_inputs(root: Path, n: int, seed: int = 0, n_images: int = 300,
                      max_samples: int = 1000, tts_cache: str | None = None,
                      plant: bool = False, question_pool: bool = False) -> Path:
    """Write a corpus of `n` inputs under `root`; return its config's path. `tts_cache`: the
    synthesis cache (default: the build's OUT/cache/tts). `plant`: add duplicates at the
    rates of PLANT (listed in planted.jsonl) and a benchmark file, and switch the content
    checks on in the config. `question_pool`: questions from a small pool (a warm cache then
    serves stage 2.2) instead of a different one per record."""
    from flows.corpora.demo import make_video, speech

    if n < 10:
        raise ValueError(f"a scale corpus needs at least 10 records (one per source), got {n}")
    root.mkdir(parents=True, exist_ok=True)
    media = root / "media"
    rng = random.Random(seed)
    per = counts(n)
    photos, signs = make_images(media / "images", min(n_images, max(8, n // 20)), seed)
    videos = []
    for i, (secs, pattern) in enumerate(VIDEOS):
        path = media / "videos" / f"clip_{i}.mp4"
        if not path.exists():
            make_video(path, secs, size="160x120", fps=10, pattern=pattern)
        videos.append(f"videos/clip_{i}.mp4")
    audio = []
    for i, (sentence, _) in enumerate(SPEECH):
        path = media / "audio" / f"utt_{i}.flac"
        if not path.exists():
            import soundfile as sf

            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, speech(sentence, i), 16000)
        audio.append(f"audio/utt_{i}.flac")

    # The plants draw from their own generator, so the unplanted records are those of plant=False.
    prng = random.Random(seed + 99) if plant else None
    variants = make_variants(media, photos) if plant else {}
    planted = open(root / "planted.jsonl", "w", encoding="utf-8") if plant else None
    copies = open(root / ".planted_copies.jsonl", "w+", encoding="utf-8") if plant else None
    with open(root / "text.json", "w", encoding="utf-8") as f, \
            open(root / "reworded.json", "w", encoding="utf-8") as g:
        w, wr = _ArrayWriter(f), _ArrayWriter(g)
        for i, rec in enumerate(_text_records(per["text"], rng, prng, question_pool)):
            if isinstance(rec, str):
                w.raw(rec)
                continue
            mark = rec.pop("_planted", None)
            w.add(rec)
            if planted is not None and mark is not None:
                planted.write(json.dumps({"kind": mark[0], "source": "scale_text", "id": rec["id"],
                                          "of": ["bench", mark[1]]}) + "\n")
            elif prng is not None and not _bad(i, "duplicate") and \
                    len(rec["conversations"]) == 4 and prng.random() < PLANT["reworded"] / 0.15:
                copy = {"id": f"rw_{rec['id']}", "conversations": [dict(t) for t in
                                                                     rec["conversations"]]}
                copy["conversations"][1]["value"] = reword(copy["conversations"][1]["value"])
                wr.add(copy)
                assert planted is not None
                planted.write(json.dumps({"kind": "reworded", "source": "scale_reworded",
                                          "id": copy["id"], "of": ["scale_text", rec["id"]]})
                              + "\n")
        w.close()
        wr.close()
    with open(root / "caption.json", "w", encoding="utf-8") as f:
        w = _ArrayWriter(f)
        for i, rec in enumerate(_caption_records(per["caption"], rng, photos, variants, prng,
                                                          question_pool)):
            w.add(rec)
            if planted is not None and rec["image"] in variants:
                planted.write(json.dumps({"kind": "variant", "source": "scale_caption",
                                          "id": rec["id"], "image": rec["image"],
                                          "of_image": variants[rec["image"]]}) + "\n")
            elif copies is not None and prng is not None and not _bad(i, "missing") and \
                    prng.random() < PLANT["exact"] / 0.26:
                copies.write(json.dumps(rec) + "\n")
        w.close()
    with open(root / "qa_vita.json", "w", encoding="utf-8") as f:
        w = _ArrayWriter(f)

        def add_copy(line: str) -> None:
            """A planted exact copy of a caption record, in the VQA source, and its plant line."""
            orig = json.loads(line)
            w.add({**orig, "set": "scale_vqa", "id": f"copy_{orig['id']}"})
            assert planted is not None
            planted.write(json.dumps({"kind": "exact", "source": "scale_vqa",
                                      "id": f"copy_{orig['id']}",
                                      "of": ["scale_caption", orig["id"]]}) + "\n")

        if copies is not None:
            copies.seek(0)
        for rec in _qa_records(per["qa"], rng, photos, question_pool):
            w.add(rec)
            line = copies.readline() if copies is not None else ""
            if line:  # one planted copy after each VQA record, until they run out
                add_copy(line)
        for line in copies or []:
            add_copy(line)
        w.close()
    if copies is not None:
        copies.close()
        (root / ".planted_copies.jsonl").unlink()
    if planted is not None:
        planted.close()
        with open(root / "bench_items.jsonl", "w", encoding="utf-8") as f:
            for k in range(BENCH_ITEMS):
                f.write(json.dumps({"id": f"item_{k:05d}", "question": benchmark_question(k),
                                    "answer": str(k % 7)}) + "\n")
    with open(root / "ocr.jsonl", "w", encoding="utf-8") as f:
        for i in range(per["ocr"]):
            j = rng.randrange(len(signs))
            f.write(json.dumps({"id": f"ocr_{i:08d}", "image": signs[j], "conversations": [
                {"from": "human", "value": "<image>\nWhat does the sign say?"},
                {"from": "gpt", "value": SIGNS[j]}]}) + "\n")
    with open(root / "video.json", "w", encoding="utf-8") as f:
        w = _ArrayWriter(f)
        for i in range(per["video"]):
            zh = rng.random() < ZH_SHARE
            q = "视频里发生了什么？" if zh else "What is shown in the video?"
            w.add({"id": f"vid_{i:08d}", "video": rng.choice(videos), "conversations": [
                {"from": "human", "value": f"<video>\n{q}"},
                {"from": "gpt", "value": _answer(rng, zh, i)}]})
        w.close()
    with open(root / "asr.jsonl", "w", encoding="utf-8") as f:
        for i in range(per["asr"]):
            j = rng.randrange(len(audio))
            f.write(json.dumps({"id": f"asr_{i:08d}", "audio": audio[j], "text": SPEECH[j][0],
                                "language": SPEECH[j][1]}, ensure_ascii=False) + "\n")
    with open(root / "pairs.txt", "w", encoding="utf-8") as f:
        for _ in range(per["tts_pair"]):
            f.write(rng.choice(PAIRS) + "\n")

    media_src = {"media_root": "media"}
    config = {
        "name": f"scale-{n}",
        "seed": 1234 + seed,
        "shard": {"max_samples": max_samples},
        "transforms": {"speech": {"enabled": True, "fraction": 0.5,
                                  **({"cache": tts_cache} if tts_cache else {})}},
        "sources": [
            {"name": "scale_text", "kind": "text", "format": "llava", "path": "text.json"},
            {"name": "scale_caption", "kind": "caption", "format": "llava",
             "path": "caption.json", **media_src},
            {"name": "scale_vqa", "kind": "qa", "format": "vita", "path": "qa_vita.json",
             **media_src},
            {"name": "scale_ocr", "kind": "ocr", "format": "llava", "path": "ocr.jsonl",
             **media_src},
            {"name": "scale_video", "kind": "video", "format": "llava", "path": "video.json",
             **media_src},
            {"name": "scale_asr", "kind": "asr", "format": "asr_jsonl", "path": "asr.jsonl",
             **media_src},
            {"name": "scale_pairs", "kind": "tts_pair", "format": "text_lines",
             "path": "pairs.txt"},
        ],
    }
    if plant:
        config["sources"].insert(1, {"name": "scale_reworded", "kind": "text", "format": "llava",
                                     "path": "reworded.json"})
        config["dedupe"] = {"exact": True, "near_text": {"enabled": True},
                            "benchmarks": [{"name": "scale_bench", "path": "bench_items.jsonl"}]}
    else:
        (root / "reworded.json").unlink()
    cfg_path = root / "corpus.yaml"
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True),
                        encoding="utf-8")
    return cfg_path


def spoken_texts() -> dict[str, list[str]]:
    """Every question a scale corpus made with `question_pool` can speak (stage 2.2), and its
    text-speech pairs, by language."""
    en = [*EN_QUESTIONS, *EN_CAPTION_Q, *EN_VQA_Q, "What does the sign say?",
          "What is shown in the video?"]
    zh = [*ZH_QUESTIONS, *ZH_CAPTION_Q, *ZH_VQA_Q, "视频里发生了什么？"]
    return {"en": en + [p for p in PAIRS if p.isascii()],
            "zh": zh + [p for p in PAIRS if not p.isascii()]}


def warm_tts_cache(cfg_path: Path, out: str) -> int:
    """Synthesise every (sentence, voice) a scale corpus can ask for into its synthesis cache,
    so that builds of any N find them there (a nightly's cache is warm); the number made."""
    from flows.build.work import Worker, work_context
    from schemas.config import load_config

    cfg = load_config(cfg_path)
    synth = Worker(work_context(cfg, out)).synth()
    sp = cfg.transforms.speech
    for lang, texts in spoken_texts().items():
        for voice in synth.backend.voices(lang):
            for text in texts:
                rate = sp.pair_sample_rate if text in PAIRS else sp.sample_rate
                synth.speak(text, voice, rate)
    return synth.calls
