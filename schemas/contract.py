"""What a trainable sample is: one contract for the ingest and for the validation gate.

Each rule names a column of the gate's per-sample table, the values that column may take, and
the reject reason a sample that breaks it gets. The ingest applies the record-level rules
(turn order, empty turns, placeholders, the token budget) to every record it writes and
rejects with the rule's reason, so whatever the gate would refuse per sample never reaches a
shard; the gate checks every rule again with Great Expectations (shards can be damaged after
they were written) and moves a failing sample out of its shard with the same reason.

`record_columns` computes the record-level columns from a record's JSON (a dict), the same way
for both sides; `row_failures` evaluates the rules on a row without Great Expectations (the
ingest, and the tests that check the two sides agree).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from schemas.params import AudioConfig, TilingConfig
from schemas.rejects import Rejected

MIN_FRAMES, MAX_FRAMES = 4, 16
# The longest sequence any stage trains on by default (VITA-1.5 packs to about 6K tokens);
# a sample over the budget could never be trained on.
DEFAULT_MAX_LEN = 6144
_PH = re.compile(r"<(image|video|audio)>")


@dataclass(frozen=True)
class Rule:
    """One per-sample check: `column` must be True (kind "true") or within [lo, hi]."""

    column: str
    reason: str
    kind: str = "true"  # "true" | "between"
    lo: float | None = None
    hi: float | None = None
    record_level: bool = False  # computed from the record alone; the ingest applies it

    def holds(self, value: Any) -> bool:
        if value is None:  # the check does not apply to this sample (no video, no audio...)
            return True
        if self.kind == "true":
            return value is True or (type(value).__name__ == "bool_" and bool(value))  # numpy
        if isinstance(value, float) and value != value:  # NaN
            return True
        return (self.lo is None or value >= self.lo) and (self.hi is None or value <= self.hi)

    def label(self) -> str:
        if self.kind == "true":
            return f"{self.column} is true"
        return f"{self.column} in [{self.lo}, {self.hi}]"


def sample_rules(tiling: TilingConfig, audio: AudioConfig, max_tokens: int) -> list[Rule]:
    """Every per-sample rule, in the order a failing sample reports them."""
    return [
        Rule("has_json", "sample_unreadable"),
        Rule("turns_ok", "bad_turn_order", record_level=True),
        Rule("turns_nonempty", "empty_turn", record_level=True),
        Rule("placeholders_ok", "placeholder_mismatch", record_level=True),
        Rule("tokens", "too_many_tokens", "between", 0, max_tokens, record_level=True),
        Rule("id_first", "duplicate_id"),
        Rule("members_ok", "member_mismatch"),
        Rule("tiles_min", "bad_tile_count", "between", 1, tiling.max_num + 1),
        Rule("tiles_max", "bad_tile_count", "between", 1, tiling.max_num + 1),
        Rule("sizes_ok", "bad_media_size"),
        Rule("frames", "bad_frame_count", "between", MIN_FRAMES, MAX_FRAMES),
        Rule("frames_rule_ok", "bad_frame_count"),
        Rule("audio_rate_ok", "bad_sample_rate"),
        Rule("audio_min_s", "audio_too_short", "between", audio.min_s * 0.99, None),
        Rule("audio_max_s", "audio_too_long", "between", None, audio.max_s * 1.01),
        Rule("audio_min_dbfs", "audio_silent", "between", audio.silence_dbfs, None),
    ]


def turn_problem(turns: Iterable[tuple[Any, Any]]) -> tuple[str, str] | None:
    """(reason, detail) when the turns are not human first, alternating, ending with gpt,
    each with some text; None when they are."""
    turns = list(turns)
    roles = [r for r, _ in turns]
    if len(roles) < 2:
        return "bad_turn_order", f"{len(roles)} turn(s); a sample needs a question and an answer"
    for i, r in enumerate(roles):
        want = "human" if i % 2 == 0 else "gpt"
        if r != want:
            return "bad_turn_order", (f"turn {i} is from {r!r} where {want!r} was expected "
                                      "(human first, alternating)")
    if roles[-1] != "gpt":
        return "bad_turn_order", "the conversation ends on a human turn; it must end with gpt"
    for i, (r, v) in enumerate(turns):
        if not isinstance(v, str) or not v.strip():
            return "empty_turn", f"turn {i} ({r}) has no text"
    return None


def _media_counts(rec: dict[str, Any]) -> dict[str, int]:
    images = rec.get("image") or []
    return {"image": 1 if isinstance(images, str) else len(images),
            "video": 1 if rec.get("video") else 0, "audio": len(rec.get("audio") or [])}


def record_tokens(rec: dict[str, Any]) -> int:
    """The sample's estimated length, as the report counts it (meta.tokens.total)."""
    tokens = (rec.get("meta") or {}).get("tokens") or {}
    if "total" in tokens:
        return int(tokens["total"])
    return int(sum(v for v in tokens.values() if isinstance(v, int | float)))


def record_columns(rec: dict[str, Any]) -> dict[str, Any]:
    """The record-level columns of the gate's table, from a record's JSON."""
    turns = rec.get("conversations") or []
    pairs = [(t.get("from"), t.get("value")) if isinstance(t, dict) else (None, None)
             for t in turns]
    problem = turn_problem(pairs)
    ph = Counter(m.group(1) for _, v in pairs if isinstance(v, str) for m in _PH.finditer(v))
    media = _media_counts(rec)
    return {
        "turns_ok": problem is None or problem[0] != "bad_turn_order",
        "turns_nonempty": problem is None or problem[0] != "empty_turn",
        "placeholders_ok": all(ph[k] == n for k, n in media.items()),
        "tokens": record_tokens(rec),
    }


def row_failures(row: dict[str, Any], rules: list[Rule]) -> list[Rule]:
    """The rules a row breaks (without Great Expectations)."""
    return [r for r in rules if r.column in row and not r.holds(row[r.column])]


def check_record(rec: dict[str, Any], max_tokens: int | None) -> None:
    """Raise the reason of the first record-level rule `rec` breaks (the ingest's side).

    With `max_tokens` None the budget is not checked (a record before its media are counted).
    """
    pairs = [(t.get("from"), t.get("value")) for t in rec.get("conversations") or []
             if isinstance(t, dict)]
    problem = turn_problem(pairs)
    if problem is not None:
        raise Rejected(*problem)
    cols = record_columns(rec)
    if not cols["placeholders_ok"]:
        raise Rejected("placeholder_mismatch", f"placeholders do not match the media {_media_counts(rec)}")
    if max_tokens is not None and cols["tokens"] > max_tokens:
        raise Rejected("too_many_tokens", f"about {cols['tokens']} tokens > max_tokens {max_tokens} "
                                          "(sample.max_tokens in the corpus config)")


def resolve_max_tokens(configured: int | None, max_lens: Iterable[int] = ()) -> int:
    """The token budget: the config's, else the longest stage's max_len, else the default."""
    if configured is not None:
        return configured
    return max(max_lens, default=DEFAULT_MAX_LEN)
