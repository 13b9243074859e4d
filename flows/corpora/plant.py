"""Duplicates planted in the scale corpus (demo --scale N --plant-duplicates): exact copies,
reworded answers, re-encoded images and benchmark questions at the rates of PLANT, each listed
in planted.jsonl with what it copies, so bench/bench_dedupe.py can measure recall and precision.

Not planted, but near-duplicates all the same: records whose template the generator filled with
the same words by chance, so that only their record numbers differ (a Chinese text record of
one turn, a video record of one clip and question: Jaccard 0.70-0.78). Their number grows with
the square of N (a few at 100k); the bench recognises them on the text (equal once digits are
masked) and counts them apart from the false positives.
"""
from __future__ import annotations

import random
from pathlib import Path

from flows.corpora.words import ANIMALS, COLOURS, COUNTRIES, FRUITS, SHAPES

# Planted duplicates (make_scale_inputs(plant=True)), as fractions of N; each is listed in
# planted.jsonl with the sample it copies, for recall and precision (bench/bench_dedupe.py).
PLANT = {"exact": 0.01,  # a caption record copied into the VQA source (same image and turns)
         # a text record with a follow-up turn (30 words or more) and one word of its answer
         # changed, in its own source: at 17 words (one turn) a changed word leaves a true
         # Jaccard of 3-word shingles of 0.67, under the default threshold of 0.7
         "reworded": 0.01,
         "leak": 0.002,  # a text record whose question is a benchmark question
         "variant": 0.01}  # a caption record whose image is another's, re-encoded smaller


BENCH_ITEMS = 500


SYNONYMS = {"next": "beside", "seen": "viewed", "Answer": "Reply"}


def benchmark_question(k: int) -> str:
    """A benchmark item's question: long enough (over 13 words) to be found by its n-grams."""
    r = random.Random(10_007 + k)
    return (f"In benchmark item {k}, looking at the {r.choice(COLOURS)} {r.choice(SHAPES)} "
            f"near the {r.choice(ANIMALS)}, how many {r.choice(FRUITS)}s would remain if "
            f"{r.randint(2, 40)} were taken away from the pile in {r.choice(COUNTRIES)}?")


def reword(text: str) -> str:
    for a, b in SYNONYMS.items():
        if f" {a} " in f" {text} ":
            return f" {text} ".replace(f" {a} ", f" {b} ", 1).strip()
    return text + " Indeed."


def make_variants(media: Path, photos: list[str], share: float = 0.1) -> dict[str, str]:
    """Re-encode a share of the photos at 3/4 of their size and JPEG quality 60; variant path
    -> the original's."""
    from PIL import Image

    out = {}
    for p in photos[:max(1, int(len(photos) * share))]:
        var = p.replace("img_", "var_")
        with Image.open(media / p) as im:
            im.resize((im.width * 3 // 4, im.height * 3 // 4)).save(media / var, quality=60)
        out[var] = p
    return out
