"""Near-duplicate text: words of CJK text, and candidates decided on the shingle sets'
Jaccard (MinHash LSH only finds them)."""

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from flows.build.content import ContentDecider
from schemas.config import config_from_dict
from schemas.record import Record
from transforms.dedupe import (
    band_keys,
    jaccard,
    jaccard_estimate,
    lsh_params,
    minhash,
    shingle_hashes,
    shingles,
    tokens,
)

WORDS = ["red", "bus", "old", "bridge", "river", "child", "waves", "sky", "stone", "dog",
         "porch", "apple", "boots", "farmer", "morning", "basket", "wooden", "green", "small",
         "bright", "slow", "past", "under", "group", "bank", "sleeps", "left", "pair"]


def test_cjk_characters_are_words_after_digits_and_latin_too():
    assert tokens("这是第964个回答：橙色的狗和72个香蕉。") == \
        ["这", "是", "第", "964", "个", "回", "答", "橙", "色", "的", "狗", "和", "72", "个", "香", "蕉"]
    assert tokens("iPhone手机 Hello_world über") == ["iphone", "手", "机", "hello", "world", "über"]


def test_shingle_hashes_give_the_sets_jaccard():
    rng = random.Random(3)
    for _ in range(20):
        a = [rng.choice(WORDS) for _ in range(rng.randint(1, 40))]
        b = [w if rng.random() < 0.8 else rng.choice(WORDS) for w in a]
        sa, sb = set(shingles(a, 3)), set(shingles(b, 3))
        assert jaccard(shingle_hashes(a, 3), shingle_hashes(b, 3)) == len(sa & sb) / len(sa | sb)


def _pair(k: int, n: int) -> tuple[list[str], list[str]]:
    """n words and the same with its middle word changed: the 3-word shingle sets' Jaccard is
    (n-5)/(n+1), 0.684 at 18 words and 0.714 at 20."""
    rng = random.Random(k)
    a = [f"{rng.choice(WORDS)}{i}" for i in range(n)]
    b = list(a)
    b[n // 2] = "changed"
    return a, b


def _texts(n: int) -> tuple[list[str], list[str]]:
    """The words of the two records `_decide` makes: "tell me" and the pair of `n` words."""
    a, b = (tokens("Tell me. " + " ".join(w)) for w in _pair(0, n))
    return a, b


def _find_seed(n: int, estimate_passes: bool) -> int:
    """A MinHash seed under which the pair of `n` words shares an LSH band and its estimate
    is on the other side of 0.7 from its true Jaccard."""
    bands, rows = lsh_params(0.7, 128)
    a, b = _texts(n)
    for seed in range(2000):
        sa, sb = minhash(a, 3, 128, seed), minhash(b, 3, 128, seed)
        shared = set(band_keys(sa, bands, rows)) & set(band_keys(sb, bands, rows))
        if shared and (jaccard_estimate(sa, sb) >= 0.7) == estimate_passes:
            return seed
    raise AssertionError("no such seed in 2000")


def _decide(tmp_path, seed: int, n: int) -> list[tuple[str, str] | None]:
    cfg = config_from_dict({
        "name": "near", "dedupe": {"near_text": {"enabled": True, "seed": seed}},
        "sources": [{"name": "t", "kind": "text", "format": "llava", "path": "t.json"}]},
        base=tmp_path, where="test", check_paths=False)
    decider = ContentDecider(cfg, str(tmp_path / f"out{seed}"), "ingest")
    got = []
    try:
        for i, words in enumerate(_pair(0, n)):
            rec = Record.model_validate({"id": f"r{i}", "set": "t", "conversations": [
                {"from": "human", "value": "Tell me."}, {"from": "gpt", "value": " ".join(words)}],
                "meta": {"task": "text", "source": "t", "lineage": "l", "language": "en"}})
            got.append(decider.decide(cfg.sources[0], i, rec)[1])
    finally:
        decider.close()
    return got


def test_a_pair_under_the_threshold_is_kept_when_its_estimate_is_over(tmp_path):
    seed = _find_seed(16, estimate_passes=True)  # "tell me" + 16 words: Jaccard 0.684
    a, b = _texts(16)
    assert jaccard(shingle_hashes(a, 3), shingle_hashes(b, 3)) < 0.7
    assert _decide(tmp_path, seed, 16) == [None, None]


def test_a_pair_over_the_threshold_is_found_when_its_estimate_is_under(tmp_path):
    seed = _find_seed(18, estimate_passes=False)  # "tell me" + 18 words: Jaccard 0.714
    a, b = _texts(18)
    assert jaccard(shingle_hashes(a, 3), shingle_hashes(b, 3)) >= 0.7
    first, second = _decide(tmp_path, seed, 18)
    assert first is None and second is not None and second[0] == "near_duplicate"
    assert "Jaccard 0.71 >= 0.7 of 3-word shingles" in second[1] and "'r0'" in second[1]


def test_shingle_and_band_hashes_do_not_depend_on_the_process():
    """They are stored in the on-disk index and compared by later builds: the same in a process
    with another hash seed (Python's str hash differs there; an int tuple's must not)."""
    import json
    import os
    import subprocess
    import sys

    words = tokens("The red bus drives past the old stone bridge, 第964个 回答, twice over")
    code = ("import json, sys; from transforms.dedupe import band_keys, minhash, shingle_hashes;"
            "w = json.loads(sys.argv[1]);"
            "print(json.dumps([shingle_hashes(w, 3).tolist(),"
            " band_keys(minhash(w, 3, 128, 7), 14, 9, 'ab12'), hash('x')]))")
    got = []
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", code, json.dumps(words)], env=env,
                             capture_output=True, text=True, check=True).stdout
        got.append(json.loads(out))
    assert got[0][2] != got[1][2]  # the seeds do change str hashes
    assert got[0][:2] == got[1][:2]
    assert got[0][0] == shingle_hashes(words, 3).tolist()
    assert got[0][1] == band_keys(minhash(words, 3, 128, 7), 14, 9, "ab12")
    assert all(0 <= k < 1 << 63 for k in got[0][1])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(WORDS[:8]), max_size=40),
       st.lists(st.lists(st.sampled_from(WORDS[:8]), min_size=0, max_size=20), max_size=4))
def test_benchmark_match_is_any_shared_window(words, items):
    """The index's match (windows looked up only inside runs of benchmark words) finds an item
    exactly when a window of n words of the text is a window of that item."""
    from transforms.dedupe import BenchmarkIndex

    n = 4
    idx = BenchmarkIndex(n)
    for k, item in enumerate(items):
        idx.add("b", f"i{k}", " ".join(item))
    grams = {tuple(item[i:i + n]): f"i{k}" for k, item in reversed(list(enumerate(items)))
             if len(item) >= n for i in range(len(item) - n + 1)}
    windows = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    expected = next((grams[w] for w in windows if w in grams), None)
    got = idx.match(words)
    assert (got[1] if got else None) == expected
