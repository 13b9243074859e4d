"""Expectation suites (Great Expectations 1.x) for built shards, as code.

Three tables are validated per stage:
- samples: one row per sample, flattened from the tars themselves (not from the manifests):
  members against placeholders, tile and frame counts and sizes, audio rate, duration and
  level, the turn structure, ids;
- shards: one row per shard: the file's sha256, size and sample count against its manifest;
- mix: one row per pool (and one for speech): achieved against requested fractions.
"""

from __future__ import annotations

import math
from typing import Any

from schemas.params import AudioConfig, TilingConfig

MIN_FRAMES, MAX_FRAMES = 4, 16


def _gx() -> Any:
    import great_expectations as gx

    return gx


def sample_suite(name: str, tiling: TilingConfig, audio: AudioConfig) -> Any:
    gx = _gx()
    e = gx.expectations
    suite = gx.ExpectationSuite(name=name)
    for exp in [
        e.ExpectColumnValuesToBeInSet(column="has_json", value_set=[True]),
        e.ExpectColumnValuesToBeInSet(column="members_ok", value_set=[True]),
        e.ExpectColumnValuesToBeUnique(column="id"),
        e.ExpectColumnValuesToBeBetween(column="tiles_min", min_value=1,
                                        max_value=tiling.max_num + 1),
        e.ExpectColumnValuesToBeBetween(column="tiles_max", min_value=1,
                                        max_value=tiling.max_num + 1),
        e.ExpectColumnValuesToBeInSet(column="sizes_ok", value_set=[True]),  # tiles, frames
        e.ExpectColumnValuesToBeBetween(column="frames", min_value=MIN_FRAMES, max_value=MAX_FRAMES),
        e.ExpectColumnValuesToBeInSet(column="frames_rule_ok", value_set=[True]),
        e.ExpectColumnValuesToBeInSet(column="audio_rate_ok", value_set=[True]),
        e.ExpectColumnValuesToBeBetween(column="audio_min_s", min_value=audio.min_s * 0.99),
        e.ExpectColumnValuesToBeBetween(column="audio_max_s", max_value=audio.max_s * 1.01),
        e.ExpectColumnValuesToBeBetween(column="audio_min_dbfs", min_value=audio.silence_dbfs),
        e.ExpectColumnValuesToBeInSet(column="turns_ok", value_set=[True]),
    ]:
        suite.add_expectation(exp)
    return suite


def shard_suite(name: str) -> Any:
    gx = _gx()
    e = gx.expectations
    suite = gx.ExpectationSuite(name=name)
    for col in ("sha256_ok", "size_ok", "count_ok"):
        suite.add_expectation(e.ExpectColumnValuesToBeInSet(column=col, value_set=[True]))
    return suite


def mix_suite(name: str) -> Any:
    gx = _gx()
    e = gx.expectations
    suite = gx.ExpectationSuite(name=name)
    # How far each achieved fraction is from the requested one, in binomial standard errors.
    suite.add_expectation(e.ExpectColumnValuesToBeBetween(column="deviation_sigmas", min_value=0,
                                                          max_value=4))
    return suite


def deviation_sigmas(requested: float, achieved: float, n: int) -> float:
    """|achieved - requested| in standard errors of a binomial draw of n; at least 1/n slack."""
    if n <= 0:
        return 0.0
    se = math.sqrt(max(requested * (1 - requested), 1e-12) / n)
    return max(0.0, abs(achieved - requested) - 1.0 / n) / max(se, 1.0 / n)
