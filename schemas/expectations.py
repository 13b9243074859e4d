"""Expectation suites (Great Expectations 1.x) for built shards, as code.

Three tables are validated per stage:
- samples: one row per sample, flattened from the tars themselves (not from the manifests),
  checked against the rules of the sample contract (schemas.contract): the turn structure,
  placeholders, the token budget, members against placeholders, tile and frame counts and
  sizes, audio rate, duration and level, ids unique across the stage;
- shards: one row per shard: the file's sha256, size, sample count and members against its
  manifest;
- mix: one row per pool (and one for speech): achieved against requested fractions.
"""

from __future__ import annotations

import math
from typing import Any

from schemas.contract import MAX_FRAMES, MIN_FRAMES, Rule

__all__ = ["MAX_FRAMES", "MIN_FRAMES", "deviation_sigmas", "mix_suite", "sample_suite",
           "shard_suite"]


def _gx() -> Any:
    import great_expectations as gx

    return gx


def sample_suite(name: str, rules: list[Rule]) -> Any:
    """The per-sample suite: one expectation per rule of the contract (schemas.contract).

    Ids unique across the stage is the rule on `id_first` (the gate sets it from an on-disk
    index over the whole stage, so a chunk of rows still sees every earlier id).
    """
    gx = _gx()
    e = gx.expectations
    suite = gx.ExpectationSuite(name=name)
    for r in rules:
        if r.kind == "true":
            suite.add_expectation(e.ExpectColumnValuesToBeInSet(column=r.column, value_set=[True]))
        else:
            suite.add_expectation(e.ExpectColumnValuesToBeBetween(
                column=r.column, min_value=r.lo, max_value=r.hi))
    return suite


def shard_suite(name: str) -> Any:
    gx = _gx()
    e = gx.expectations
    suite = gx.ExpectationSuite(name=name)
    for col in ("sha256_ok", "size_ok", "count_ok", "members_match_manifest"):
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
