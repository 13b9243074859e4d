"""One contract for a good sample: what the ingest writes, the gate passes; what the gate
would refuse, the ingest rejects with the same reason. Hand-made cases, then hypothesis over
generated records (conversations, ids, placeholder layouts, media lists)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, seed, settings
from hypothesis import strategies as st

from flows.build.pipeline import build
from flows.build.work import Worker, work_context
from flows.validation.gate import validate_stage
from flows.validation.scan import sample_row
from schemas.config import load_config
from schemas.contract import check_record, record_columns, row_failures, sample_rules, turn_problem
from schemas.rejects import REASONS, Rejected
from storage.readers import read_source
from storage.shards import sample_key

from conftest import write_flac, write_image

MAX_TOKENS = 1000  # one 3-tile image (768 tokens) fits; two do not


def make_corpus(root: Path, records: list, fmt: str = "vita") -> Path:
    """A one-source corpus over a small media pool: two JPEGs (1 and 3 tiles), a FLAC."""
    write_image(root / "media" / "small.jpg", (48, 48), seed=1)
    write_image(root / "media" / "wide.jpg", (900, 450), seed=2)
    write_flac(root / "media" / "tone.flac", 1.0)
    (root / "recs.json").write_text(json.dumps(records, ensure_ascii=False))
    cfg = {"name": "contract", "sample": {"max_tokens": MAX_TOKENS}, "shard": {"max_samples": 7},
           "sources": [{"name": "src", "kind": "qa", "format": fmt, "path": "recs.json",
                        "media_root": "media"}]}
    (root / "corpus.yaml").write_text(yaml.safe_dump(cfg))
    return root / "corpus.yaml"


def qa(rid, turns, image=None, audio=None) -> dict:
    rec = {"id": rid, "conversations": [{"from": f, "value": v} for f, v in turns]}
    if image is not None:
        rec["image"] = image
    if audio is not None:
        rec["audio"] = audio
    return rec


def rejects(out: Path) -> list[dict]:
    return [json.loads(line) for p in sorted((out / "rejects").glob("*.jsonl"))
            for line in p.read_text().splitlines()]


def written_ids(out: Path) -> list[str]:
    return [s["id"] for p in sorted((out / "ingest").glob("*.manifest.json"))
            for s in json.loads(p.read_text())["samples"]]


# --- the rules themselves ------------------------------------------------------------------

@pytest.mark.parametrize("turns,reason", [
    ([("human", "q"), ("gpt", "a")], None),
    ([("human", "q"), ("gpt", "a"), ("human", "q2"), ("gpt", "a2")], None),
    ([("human", "q"), ("gpt", "a"), ("human", "and then?")], "bad_turn_order"),
    ([("gpt", "hello"), ("human", "q"), ("gpt", "a")], "bad_turn_order"),
    ([("human", "q"), ("human", "q2"), ("gpt", "a")], "bad_turn_order"),
    ([("human", "q")], "bad_turn_order"),
    ([], "bad_turn_order"),
    ([("human", "q"), ("gpt", "  ")], "empty_turn"),
])
def test_turn_rules(turns, reason):
    got = turn_problem(turns)
    assert (got[0] if got else None) == reason
    if got:
        assert got[1]  # a detail a person can act on


def test_the_ingest_and_the_gate_share_the_rules():
    from schemas.params import AudioConfig, TilingConfig

    rules = sample_rules(TilingConfig(), AudioConfig(), 100)
    bad = {"id": "x", "conversations": [{"from": "human", "value": "q"}],
           "meta": {"tokens": {"total": 150}}}
    cols = record_columns(bad)
    assert {r.reason for r in row_failures(cols, rules)} == {"bad_turn_order", "too_many_tokens"}
    with pytest.raises(Rejected) as err:
        check_record(bad, 100)
    assert err.value.reason == "bad_turn_order"
    assert all(r.reason in REASONS for r in rules)


# --- hand-made bad inputs through the real build -------------------------------------------

def test_bad_conversations_are_rejected_at_ingest_not_quarantined_later(tmp_path):
    recs = [
        qa("good1", [("human", "<image>\nWhat is it?"), ("gpt", "A square.")], image="small.jpg"),
        qa("ends_on_human", [("human", "q"), ("gpt", "a"), ("human", "and?")]),
        qa("starts_with_gpt", [("gpt", "hi"), ("human", "q"), ("gpt", "a")]),
        qa("empty_answer", [("human", "q"), ("gpt", "")]),
        qa("too_long", [("human", "<image>\n<image>\nCompare."), ("gpt", "Same.")],
           image=["wide.jpg", "wide.jpg"]),
        qa("mismatch", [("human", "<image>\nq"), ("gpt", "a")]),
        {"id": "no_conv"},
        qa("good2", [("human", "q " * 50), ("gpt", "a")]),
    ]
    out = tmp_path / "out"
    build(load_config(make_corpus(tmp_path / "in", recs)), str(out))
    by_id = {r["id"]: r["reason"] for r in rejects(out)}
    assert by_id == {"ends_on_human": "bad_turn_order", "starts_with_gpt": "bad_turn_order",
                     "empty_answer": "empty_turn", "too_long": "too_many_tokens",
                     "mismatch": "placeholder_mismatch", "no_conv": "missing_conversations"}
    assert sorted(written_ids(out)) == ["good1", "good2"]
    v = validate_stage(str(out), "ingest")
    assert v["passed"] and v["failed"] == [] and v["removed_samples"]["count"] == 0


def test_ids_that_sanitise_alike_are_different_samples(tmp_path):
    ids = ["a/b", "a b", "a_b", "a.b", "a\u00e9b", "a\u00e8b"]
    recs = [qa(i, [("human", f"question {n}"), ("gpt", "answer")]) for n, i in enumerate(ids)]
    recs.append(qa("a/b", [("human", "again"), ("gpt", "answer")]))  # really the same id
    out = tmp_path / "out"
    build(load_config(make_corpus(tmp_path / "in", recs)), str(out))
    assert written_ids(out) == ids
    (dup,) = rejects(out)
    assert dup["reason"] == "duplicate_id" and dup["id"] == "a/b" and dup["index"] == 6
    assert len({sample_key("src", i) for i in ids}) == len(ids)


def test_every_reject_line_names_its_record(tmp_path):
    root = tmp_path / "in"
    recs = [qa("ph", [("human", "<image>\nq"), ("gpt", "a")]),
            {"id": "noconv", "image": "small.jpg"},
            {"id": "badconv", "conversations": [{"from": "robot", "value": "x"}]},
            {"id": "badconv2", "conversations": "hello"}]
    out = tmp_path / "out"
    build(load_config(make_corpus(root, recs)), str(out))
    assert {r["id"]: r["reason"] for r in rejects(out)} == {
        "ph": "placeholder_mismatch", "noconv": "missing_conversations",
        "badconv": "bad_conversations", "badconv2": "bad_conversations"}
    # ASR: an empty transcript names its record too.
    (root / "asr.jsonl").write_text(json.dumps({"id": "utt1", "audio": "tone.flac", "text": ""})
                                    + "\n")
    cfg = yaml.safe_load((root / "corpus.yaml").read_text())
    cfg["sources"] = [{"name": "asr", "kind": "asr", "format": "asr_jsonl", "path": "asr.jsonl",
                       "media_root": "media"}]
    (root / "corpus.yaml").write_text(yaml.safe_dump(cfg))
    out2 = tmp_path / "out2"
    build(load_config(root / "corpus.yaml"), str(out2))
    assert [(r["id"], r["reason"]) for r in rejects(out2)] == [("utt1", "missing_text")]


# --- generated records ------------------------------------------------------------------------

_WORDS = st.sampled_from(["What", "is", "this", "\u8fd9\u662f\u4ec0\u4e48", "?", "Describe",
                          "<image>", "<audio>", "<video>", "", " ", "\n", "long " * 300])
_VALUE = st.lists(_WORDS, max_size=6).map(" ".join)
_TURN = st.tuples(st.sampled_from(["human", "gpt", "human", "gpt", "system"]), _VALUE)
_ID = st.one_of(st.none(), st.integers(0, 5).map(str),
                st.text(st.sampled_from("ab_-/. \u00e9\u4e2d"), min_size=1, max_size=6))
_IMAGES = st.one_of(st.none(), st.sampled_from(["small.jpg", "wide.jpg", "missing.jpg"]),
                    st.lists(st.sampled_from(["small.jpg", "wide.jpg"]), max_size=2))
_AUDIO = st.one_of(st.none(), st.lists(st.just("tone.flac"), max_size=2))


@st.composite
def records(draw) -> dict:
    turns = draw(st.lists(_TURN, max_size=5))
    if draw(st.booleans()):  # well-formed more often than chance would give
        turns = [("human" if i % 2 == 0 else "gpt", v or "text") for i, (_, v) in
                 enumerate(turns + ([("gpt", "ok")] if len(turns) % 2 else []))]
    rec: dict = {"conversations": [{"from": f, "value": v} for f, v in turns]}
    rid = draw(_ID)
    if rid is not None:
        rec["id"] = rid
    images, audio = draw(_IMAGES), draw(_AUDIO)
    if images is not None:
        rec["image"] = images
    if audio is not None:
        rec["audio"] = audio
    if draw(st.booleans()) and rec["conversations"]:  # placeholders that match the media
        n_img = 0 if images is None else 1 if isinstance(images, str) else len(images)
        head = "<image>\n" * n_img + "<audio>\n" * len(audio or [])
        first = rec["conversations"][0]
        first["value"] = head + first["value"].replace("<image>", "").replace(
            "<audio>", "").replace("<video>", "")
    return rec


@pytest.fixture(scope="module")
def worker_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    cfg = load_config(make_corpus(root, []))
    return root, cfg, Worker(work_context(cfg, str(root / "out")))


@seed(20261202)
@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(rec=records())
def test_each_record_is_written_and_passes_the_gate_or_rejected_with_a_reason(worker_env, rec):
    root, cfg, worker = worker_env
    (root / "recs.json").write_text(json.dumps([rec], ensure_ascii=False))
    (item,) = list(read_source(cfg.sources[0]))
    if item.error is not None:
        assert item.error.reason in REASONS and item.record is None
        event(f"rejected by the reader: {item.error.reason}")
        return
    payload = {"source": "src", "index": 0, "record": item.record.model_dump_json(by_alias=True)}
    result = worker(payload)
    if not result["ok"]:
        assert result["reason"] in REASONS
        event(f"rejected by the work: {result['reason']}")
        return
    event("written")
    members = dict(zip(result["suffixes"], result["payloads"], strict=True))
    row = sample_row("s.tar", sample_key("src", item.record.id), members, 16000, 24000)
    row["id_first"] = True
    rules = sample_rules(cfg.transforms.tiling, cfg.transforms.audio, MAX_TOKENS)
    assert row_failures(row, rules) == [], (rec, row)


@settings(max_examples=4, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(batch=st.lists(records(), min_size=10, max_size=25))
def test_a_generated_corpus_is_accounted_for_and_the_gate_passes_what_ingest_wrote(tmp_path_factory,
                                                                                  batch):
    root = tmp_path_factory.mktemp("batch")
    out = root / "out"
    report = build(load_config(make_corpus(root / "in", batch)), str(out))
    src = report["sources"]["src"]
    assert src["inputs"] == len(batch) == src["written"] + src["rejected"]
    written = {s["index"] for p in (out / "ingest").glob("*.manifest.json")
               for s in json.loads(p.read_text())["samples"]}
    rejected = {r["index"] for r in rejects(out)}
    assert written.isdisjoint(rejected) and written | rejected == set(range(len(batch)))
    assert all(r["reason"] in REASONS for r in rejects(out))
    if written:
        v = validate_stage(str(out), "ingest")
        assert v["passed"] and v["removed_samples"]["count"] == 0, v["failed"]


def test_stage_speech_never_pushes_a_sample_over_the_budget(tmp_path):
    from schemas.recipes import DEFAULT_RECIPES

    # Questions of about 90 estimated tokens under a budget of 110: as text they fit; spoken,
    # about 20 s of speech is about 250 audio tokens, which would not.
    long_q = "Please describe in detail what happens next in this story about the old harbour. " * 4
    recs = [qa(f"q{i}", [("human", long_q + str(i)), ("gpt", "It rains.")]) for i in range(12)]
    recs += [qa(f"s{i}", [("human", f"Why does the sky look blue on day {i}?"),
                          ("gpt", "Because.")]) for i in range(12)]
    cfg_path = make_corpus(tmp_path / "in", recs)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["sample"]["max_tokens"] = 110
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    recipe = next(r for r in DEFAULT_RECIPES if r.stage == "2.2").model_copy(
        update={"pools": {"qa": 1.0}, "speech_fraction": 1.0})
    build(load_config(cfg_path), str(out), stages=[recipe])
    spoken = {}
    for p in sorted((out / "stage_2.2").glob("*.manifest.json")):
        for s in json.loads(p.read_text())["samples"]:
            assert s["tokens"] <= 110, s
            spoken[s["id"]] = (s.get("speech") or {}).get("spoken", 0)
    assert all(spoken[f"s{i}"] == 1 for i in range(12))  # short questions are spoken
    assert all(spoken[f"q{i}"] == 0 for i in range(12))  # long ones stay text
    v = validate_stage(str(out), "stage_2.2")
    assert v["removed_samples"]["count"] == 0, v["removed_samples"]
