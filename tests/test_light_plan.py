"""Light planning: the driver hands out raw text and ids, the workers make the records.

Whatever the inputs (odd ids, duplicates, bad turns, media fields of the wrong type, lines that
are not JSON or not UTF-8), a light plan must give every input the outcome the parsed plan
gives it: the same id, key and record, or the same reject, and the same duplicate decisions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flows.build.partitions import light_record, write_partition
from flows.build.plan import SourcePlanner
from schemas.config import CorpusConfig
from storage.readers import parse_input, read_source

_IDS = st.one_of(st.none(), st.sampled_from(["", "a", "a", "b", "x.y", "p/q", "中文", "  "]),
                 st.integers(0, 3), st.just([1]))
_TEXT = st.sampled_from(["hi", "", "  ", "<image>\nWhat is it?", "two <audio> <audio>",
                         "<video>", "Describe.", "为什么？", "a\u3000b", "\u3000"])
_TURN = st.fixed_dictionaries(
    {"from": st.sampled_from(["human", "gpt", "human", "gpt", "system"]), "value": _TEXT},
    optional={"extra": st.just(1)})
_MEDIA = {"image": st.sampled_from([None, "a.jpg", "", ["a.jpg", "b.jpg"], [], [1], 5]),
          "video": st.sampled_from([None, "v.mp4", "", ["v.mp4"]]),
          "audio": st.sampled_from([None, ["x.flac"], "x.flac", []])}


@st.composite
def _conversations(draw: st.DrawFn) -> Any:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.sampled_from([None, "text", [], 3]))
    if kind < 5:  # well formed: human first, alternating, ending with gpt
        n = draw(st.integers(1, 3))
        return [{"from": r, "value": draw(_TEXT)} for _ in range(n) for r in ("human", "gpt")]
    return draw(st.lists(_TURN, max_size=4))


@st.composite
def _element(draw: st.DrawFn) -> str:
    """One element's raw JSON text: mostly records, some not objects or not JSON at all."""
    kind = draw(st.integers(0, 19))
    if kind == 0:
        return draw(st.sampled_from(['{"id": "m" "conversations": []}', "5", '"str"', "[1, 2]",
                                     '{"id": "s", "conversations": [{"from": "human", "value": '
                                     '"a\\ud800"}, {"from": "gpt", "value": "b"}]}']))
    rec: dict[str, Any] = {}
    rid = draw(_IDS)
    if rid is not None or draw(st.booleans()):
        rec["id"] = rid
    if draw(st.integers(0, 9)):
        rec["conversations"] = draw(_conversations())
    for field, values in _MEDIA.items():
        if draw(st.integers(0, 3)) == 0:
            rec[field] = draw(values)
    if draw(st.integers(0, 4)) == 0:
        rec[draw(st.sampled_from(["set", "source", "meta", "score"]))] = \
            draw(st.sampled_from(["s", 1.5, {"k": [1, None]}, "", None]))
    return json.dumps(rec, ensure_ascii=draw(st.booleans()))


def _config(path: Path, kind: str, fmt: str, extra: dict[str, Any] | None = None
            ) -> CorpusConfig:
    return CorpusConfig.model_validate({
        "name": "t", "shard": {"max_samples": 4},
        "sources": [{"name": "src", "kind": kind, "format": fmt, "path": str(path),
                     **(extra or {})}]})


def outcomes(cfg: CorpusConfig, out: Path, light: bool) -> list[dict[str, Any]]:
    """Every input as the worker will take it: the planner's inputs, a light one made into
    its record (or reject) as write_partition makes it."""
    planner = SourcePlanner(cfg, cfg.sources[0], str(out), light=light)
    got = []
    for part in planner.partitions():
        for inp in part.inputs:
            inp = dict(inp)
            if inp.pop("light", False):
                assert "record" not in inp
                record, failed = light_record(cfg.sources[0], inp)
                if failed is not None:
                    inp["error"] = (failed["reason"], failed["detail"])
                else:
                    inp["record"] = record
            got.append(inp)
    planner.abort()
    return got


def _same_both_ways(tmp: Path, cfg: CorpusConfig) -> list[dict[str, Any]]:
    parsed = outcomes(cfg, tmp / "parsed", light=False)
    light = outcomes(cfg, tmp / "light", light=True)
    assert light == parsed
    return parsed


_SETTINGS = settings(max_examples=60, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])


@_SETTINGS
@given(elements=st.lists(_element(), min_size=1, max_size=14),
       kind=st.sampled_from(["text", "qa", "caption", "video", "tts_pair"]),
       fmt=st.sampled_from(["llava", "vita", "jsonl"]))
def test_light_and_parsed_plans_agree_on_conversation_records(tmp_path_factory, elements, kind,
                                                              fmt):
    tmp = tmp_path_factory.mktemp("conv")
    if fmt == "jsonl":
        path = tmp / "in.jsonl"
        path.write_text("\n".join(e.replace("\n", " ") for e in elements) + "\n")
    else:
        path = tmp / "in.json"
        path.write_text("[\n" + ",\n".join(elements) + "\n]\n")
    got = _same_both_ways(tmp, _config(path, kind, "llava" if fmt == "jsonl" else fmt))
    assert [g["index"] for g in got] == list(range(len(got)))


@_SETTINGS
@given(values=st.lists(st.fixed_dictionaries(
    {}, optional={"id": _IDS, "audio": st.sampled_from(["a.flac", "", 5]), "text": _TEXT,
                  "language": st.sampled_from(["en", "", 5])}), min_size=1, max_size=10),
       prompt=st.sampled_from(["Transcribe.", "<audio> again"]))
def test_light_and_parsed_plans_agree_on_asr_lines(tmp_path_factory, values, prompt):
    tmp = tmp_path_factory.mktemp("asr")
    path = tmp / "asr.jsonl"
    path.write_text("".join(json.dumps(v) + "\n" for v in values) + "not json\n")
    _same_both_ways(tmp, _config(path, "asr", "asr_jsonl", {"asr_prompt": prompt}))


@_SETTINGS
@given(lines=st.lists(st.sampled_from([b"Hello there.", b"  ", b"\xe4\xbd\xa0\xe5\xa5\xbd",
                                       b"bad \xff byte", b"say <audio>", b"\xe3\x80\x80",
                                       b"crlf line\r", b"<image> x", b"x" * 50]),
                      min_size=1, max_size=12))
def test_light_and_parsed_plans_agree_on_text_lines(tmp_path_factory, lines):
    tmp = tmp_path_factory.mktemp("lines")
    path = tmp / "pairs.txt"
    path.write_bytes(b"\n".join(lines) + b"\n")
    _same_both_ways(tmp, _config(path, "tts_pair", "text_lines"))


def _text_corpus(root: Path, n: int) -> CorpusConfig:
    root.mkdir(parents=True, exist_ok=True)
    recs: list[str] = []
    for i in range(n):
        rid = f"q{i - 5}" if i % 7 == 6 else f"q{i}"  # a duplicate now and then
        turns = [{"from": "human", "value": f"Question {i}: why?"},
                 {"from": "gpt", "value": f"Because {i}."}]
        if i % 11 == 10:
            turns = turns[:1]  # a question with no answer: rejected
        recs.append(json.dumps({"id": rid, "conversations": turns}))
        if i % 13 == 12:
            recs.append('{"id": "broken" "conversations": []}')
    (root / "text.json").write_text("[\n" + ",\n".join(recs) + "\n]\n")
    return _config(root / "text.json", "text", "llava")


def test_light_plan_hands_out_no_parsed_record(tmp_path):
    cfg = _text_corpus(tmp_path / "in", 40)
    planner = SourcePlanner(cfg, cfg.sources[0], str(tmp_path / "out"))
    assert planner.light  # the default when no content decision needs the record
    inputs = [inp for part in planner.partitions() for inp in part.inputs]
    planner.abort()
    assert not any("record" in inp for inp in inputs)
    assert sum("light" in inp for inp in inputs) == 40 - 5 - 3  # less duplicates, no answers
    reasons = sorted({inp["error"][0] for inp in inputs if "error" in inp})
    assert reasons == ["bad_turn_order", "duplicate_id", "malformed_json"]


def test_light_and_parsed_builds_write_the_same_parts(tmp_path):
    cfg = _text_corpus(tmp_path / "in", 30)
    written = {}
    for light in (False, True):
        out = tmp_path / f"out-{light}"
        planner = SourcePlanner(cfg, cfg.sources[0], str(out), light=light)
        for part in planner.partitions():
            planner.add(part.start, part.end, write_partition(cfg, str(out), part))
        st_ = planner.finish()
        assert st_.inputs == st_.written + st_.rejected == 30 + 2
        written[light] = {p.relative_to(out).as_posix(): p.read_bytes()
                          for p in sorted(out.rglob("*")) if p.is_file()
                          and p.suffix in (".tar", ".jsonl", ".json") and "state" not in p.parts}
    assert written[True].keys() == written[False].keys()
    assert [k for k in written[True] if k.endswith(".tar")]
    assert written[True] == written[False]


def test_a_worker_reject_reads_as_the_drivers(tmp_path):
    """Were a light input not a record after all, the worker rejects it with the reason and
    detail a full read gives it."""
    cfg = _text_corpus(tmp_path / "in", 12)
    src = cfg.sources[0]
    full = [it for it in read_source(src) if it.error is not None and it.record_id]
    assert full
    for it in full:
        again = parse_input(src, it.raw, it.index, it.lineage)
        assert (again.error.reason, again.error.detail, again.record_id) == \
            (it.error.reason, it.error.detail, it.record_id)
        _, failed = light_record(src, {"raw": it.raw, "index": it.index, "lineage": it.lineage})
        assert (failed["reason"], failed["detail"]) == (it.error.reason, it.error.detail)
