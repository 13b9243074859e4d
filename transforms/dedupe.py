"""Content identity of one record: its normalised text, an exact content key, word shingles
and their MinHash signature, LSH band keys, n-grams against benchmarks, an image's pHash.

Pure functions (and one small class holding a benchmark's n-grams); the decisions across
records live in the build's planner (flows.build.content) and their index on disk
(storage.content).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import unicodedata
from collections.abc import Iterable
from functools import lru_cache

import numpy as np

from schemas.record import Record

_PLACEHOLDER = re.compile(r"<(image|video|audio)>")
# Han, kana and Hangul characters are words of their own: those scripts have no spaces. A run
# of other word characters is a word, and stops at a CJK character ("第12个" is 第, 12, 个: a
# number glued to the characters after it would turn a changed number into a changed phrase).
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af"
_TOKEN = re.compile(f"[{_CJK}]|[^\\W_{_CJK}]+")


def normalise(text: str) -> str:
    """Text as compared: NFKC, placeholders dropped, lower case, whitespace folded."""
    text = _PLACEHOLDER.sub(" ", unicodedata.normalize("NFKC", text))
    return " ".join(text.lower().split())


def tokens(text: str) -> list[str]:
    """Words of `text` after `normalise` (punctuation dropped; CJK characters one each)."""
    return _TOKEN.findall(normalise(text))


def content_key(rec: Record, media_sha256: dict[str, list[str]]) -> str:
    """What makes two samples the same: the normalised turns with their speakers and the
    media's bytes (by their hashes, in placeholder order)."""
    h = hashlib.sha256()
    for t in rec.conversations:
        h.update(f"{t.from_}\x00{normalise(t.value)}\x01".encode("utf-8", "surrogatepass"))
    for kind in ("image", "video", "audio"):
        h.update(f"{kind}:{','.join(media_sha256.get(kind, []))}\x02".encode())
    return h.hexdigest()


def shingles(words: list[str], size: int) -> list[str]:
    if len(words) <= size:
        return [" ".join(words)] if words else []
    return [" ".join(words[i:i + size]) for i in range(len(words) - size + 1)]


def minhash(words: list[str], shingle: int, num_perm: int, seed: int,
            grams: list[str] | None = None) -> list[int]:
    """The MinHash signature of the word shingles (rensa's RMinHash: seeded permutations);
    `grams`: the shingles when the caller has them already."""
    from rensa import RMinHash

    m = RMinHash(num_perm=num_perm, seed=seed)
    m.update(shingles(words, shingle) if grams is None else grams)
    return m.digest()


def jaccard_estimate(a: list[int], b: list[int]) -> float:
    """The share of equal signature values: the estimate of the shingle sets' Jaccard."""
    return sum(map(int.__eq__, a, b)) / len(a)


@lru_cache(maxsize=1 << 16)
def _word_hash(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode("utf-8", "surrogatepass"),
                                          digest_size=8).digest(), "little")


MASK64 = (1 << 64) - 1


def shingle_hashes(words: list[str], size: int) -> np.ndarray:
    """The shingle set as sorted distinct 64-bit hashes: what the LSH candidates are checked
    on. A shingle's hash is Python's hash of the tuple of its words' blake2b hashes, stable
    across processes and machines (an int's hash, and so a tuple of ints', does not depend on
    PYTHONHASHSEED; the interpreter's version is in the decisions' fingerprint).
    MinHash's estimate has a standard error of sqrt(J(1-J)/num_perm), 0.04 at 128
    permutations, so pairs of 0.62 pass a 0.7 threshold and pairs of 0.75 fail it; the set
    itself decides exactly."""
    w = list(map(_word_hash, words))
    if len(w) <= size:
        hs = {hash(tuple(w)) & MASK64} if w else set()
    else:
        hs = {hash(tuple(w[i:i + size])) & MASK64 for i in range(len(w) - size + 1)}
    return np.array(sorted(hs), dtype="<u8")


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """The Jaccard similarity of two `shingle_hashes` sets."""
    if not a.size and not b.size:
        return 1.0
    inter = np.intersect1d(a, b, assume_unique=True).size
    return inter / (a.size + b.size - inter)


@lru_cache(maxsize=64)
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands*rows <= num_perm minimising the weighted false positive and
    false negative areas of the S-curve at `threshold` (the usual LSH choice)."""
    from scipy.integrate import quad

    best, arg = float("inf"), (1, num_perm)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = quad(lambda s, b=b, r=r: 1 - (1 - s ** r) ** b, 0.0, threshold)[0]
            fn = quad(lambda s, b=b, r=r: (1 - s ** r) ** b, threshold, 1.0)[0]
            if 0.5 * fp + 0.5 * fn < best:
                best, arg = 0.5 * fp + 0.5 * fn, (b, r)
    return arg


def band_keys(sig: list[int], bands: int, rows: int, salt: str = "") -> list[int]:
    """One 63-bit key per band (Python's hash of the band's number, `salt` and its rows, all
    ints: stable across processes, as shingle_hashes), for an index keyed by (band, key).
    Samples with different salts never share a bucket. A collision only adds a candidate,
    which the shingle sets then decide."""
    s = _word_hash(salt) if salt else 0
    return [hash((b, s, *sig[b * rows:(b + 1) * rows])) & (MASK64 >> 1) for b in range(bands)]


def media_salt(media_sha256: dict[str, list[str]] | None) -> str:
    """What near-duplicate text must also share: the same media (none for text-only samples).
    The same caption template on two different photos is not a duplicate sample."""
    if not media_sha256 or not any(media_sha256.values()):
        return ""
    blob = json.dumps({k: v for k, v in sorted(media_sha256.items()) if v}).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def ngram_keys(words: list[str], n: int) -> Iterable[int]:
    """Keys of the `n`-token windows of `words`, for an index built in the same process (Python's
    hash of the window: text hashes differ between processes, so never store them)."""
    for i in range(len(words) - n + 1):
        yield hash(tuple(words[i:i + n]))


class BenchmarkIndex:
    """The n-grams of benchmark items, by key -> (benchmark, item id). It grows with the
    benchmarks (tens of thousands of items), never with the corpus, and is built from the
    benchmark files by each build (its keys hold in this process only)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.grams: dict[int, tuple[str, str]] = {}
        self.items: dict[str, int] = {}  # benchmark -> items indexed
        self.too_short: dict[str, int] = {}  # benchmark -> items under n tokens (not indexed)
        self.vocab: set[str] = set()  # every word of an indexed n-gram

    def add(self, benchmark: str, item: str, text: str) -> None:
        words = tokens(text)
        self.items.setdefault(benchmark, 0)
        self.too_short.setdefault(benchmark, 0)
        if len(words) < self.n:
            self.too_short[benchmark] += 1
            return
        self.items[benchmark] += 1
        self.vocab.update(words)
        for k in ngram_keys(words, self.n):
            self.grams.setdefault(k, (benchmark, item))

    def match(self, words: list[str]) -> tuple[str, str] | None:
        """The first benchmark item sharing an n-gram with `words`, or None. Only windows of
        n words that are all in the benchmarks' vocabulary are looked up."""
        if not self.grams or len(words) < self.n:
            return None
        run = 0  # how many words before i + 1, in a row, are benchmark words
        vocab, n = self.vocab, self.n
        for i, w in enumerate(words):
            run = run + 1 if w in vocab else 0
            if run >= n:
                hit = self.grams.get(hash(tuple(words[i - n + 1:i + 1])))
                if hit is not None:
                    return hit
        return None


def phash(data: bytes) -> str:
    """The 64-bit DCT perceptual hash of an image (imagehash's pHash), as 16 hex digits."""
    import imagehash
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.draft("L", (128, 128))  # pHash works on 32x32: a JPEG decodes at reduced scale
        return str(imagehash.phash(im.convert("L")))
