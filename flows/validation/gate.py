"""The validation gate: Great Expectations over what the shards really hold.

For each stage folder the tars are read (in parallel through an executor: in-process or Ray
Data) shard by shard, flattened to one metadata row per sample (no media kept) and one row per
shard, and checked with the suites in schemas.expectations, whose per-sample rules are the
contract the ingest applies too (schemas.contract). The work streams: sample rows are checked
in chunks of `chunk_rows`, ids are checked for uniqueness across the whole stage through an
on-disk index, and the data mix is computed from running counts, so memory does not grow with
the stage.

Quarantine works at the grain of the failure:
- a sample that breaks a per-sample rule is taken out of its shard: the original shard and
  manifest are kept under OUT/validation/quarantine/<stage>/, the shard is rewritten without
  the sample, and the sample goes to the reject store with the rule's reason; the stage then
  passes with its good samples (the verdict lists what was removed);
- a shard whose bytes no longer match its manifest (sha256, size, count, the members the
  manifest lists) is moved to the quarantine whole, with a `.failed.json`, and the stage fails
  until the next build rebuilds it;
- a data mix far from the recipe fails the stage without touching a shard.
Nothing is deleted. The verdict (pass or fail, and the sha256 of every shard it passed) goes to
OUT/validation/<stage>.verdict.json and the Data Docs to
OUT/validation/gx/uncommitted/data_docs/local_site/index.html. Training and export
check it with storage.verdict.require_verdict before they read a stage.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import tempfile
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from flows.build.executors import Executor, LocalExecutor
from flows.validation.quarantine import quarantine, remove_samples
from flows.validation.scan import ShardScanner, manifests
from flows.validation.suites import gx_context, mix_table, run_suite
from schemas.config import CorpusConfig, config_from_dict
from schemas.contract import Rule, sample_rules
from schemas.expectations import mix_suite, sample_suite, shard_suite
from schemas.recipes import max_tokens_for
from storage import uri
from storage.verdict import VALIDATION_DIR

DEFAULT_CHUNK_ROWS = 50_000  # sample rows checked by one Great Expectations run


def _saved_config(out: str) -> CorpusConfig:
    import yaml

    return config_from_dict(yaml.safe_load(uri.read_bytes(uri.join(out, "corpus.yaml"))),
                            check_paths=False)


class _IdIndex:
    """First occurrence of each id in stage order, on disk (SQLite): bounded memory however
    many samples a stage holds."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="vita-ids-")
        self.db = sqlite3.connect(os.path.join(self._dir.name, "ids.sqlite"))
        self.db.execute("PRAGMA journal_mode=OFF")
        self.db.execute("PRAGMA synchronous=OFF")
        self.db.execute("CREATE TABLE ids (id TEXT PRIMARY KEY, shard TEXT, key TEXT)")

    def first(self, rows: list[dict[str, Any]]) -> None:
        """Set each row's `id_first`: False when an earlier row of the stage had its id."""
        for row in rows:
            cur = self.db.execute("INSERT OR IGNORE INTO ids VALUES (?, ?, ?)",
                                  (row["id"], row["shard"], row["key"]))
            row["id_first"] = cur.rowcount == 1
            if not row["id_first"]:
                row["id_first_at"] = self.db.execute(
                    "SELECT shard, key FROM ids WHERE id = ?", (row["id"],)).fetchone()

    def close(self) -> None:
        self.db.close()
        self._dir.cleanup()


# (stage, shards scanned, samples scanned): called after each shard
ValidationProgress = Callable[[str, int, int], None]


def validate_stage(out: str, stage: str, executor: Executor | None = None,
                   chunk_rows: int = DEFAULT_CHUNK_ROWS,
                   progress: ValidationProgress | None = None) -> dict[str, Any]:
    """Validate OUT/<stage>: take failing samples out of their shards, quarantine damaged
    shards; write and return the verdict."""
    import pandas as pd

    cfg = _saved_config(out)
    sp = cfg.transforms.speech
    max_tokens = max_tokens_for(cfg.sample.max_tokens)
    rules = sample_rules(cfg.transforms.tiling, cfg.transforms.audio, max_tokens)
    by_column = {r.column: r for r in rules}
    folder = uri.join(out, stage)
    payloads = (((m["shard"],), {"tar": uri.join(folder, m["shard"]), "manifest": m})
                for m in manifests(folder) if m["shard"])
    scan = functools.partial(ShardScanner, cfg.transforms.audio.sample_rate, sp.pair_sample_rate)
    ctx = gx_context(out)
    suite = sample_suite(f"{stage}.samples", rules)
    shard_rows: list[dict[str, Any]] = []
    shas: dict[str, str | None] = {}
    results: list[dict[str, Any]] = []
    # shard -> key -> (id, reasons, labels): the samples that failed a per-sample rule
    removals: dict[str, dict[str, dict[str, Any]]] = {}
    sources: Counter[str] = Counter()  # kept samples per source, for the mix
    speech = Counter()
    n_samples = n_chunks = 0
    damaged: set[str] = set()
    chunk: list[dict[str, Any]] = []
    docs: list[Any] = []  # validation results to render in the Data Docs
    ids = _IdIndex()

    def check_chunk() -> None:
        nonlocal n_chunks
        if not chunk:
            return
        df = pd.DataFrame(chunk)
        n_chunks += 1
        failing: dict[int, list[Rule]] = {}
        for r in run_suite(ctx, stage, "samples", suite, df, docs):
            results.append({**r, "chunk": n_chunks})
            rule = by_column.get(r["column"])
            for i in r["rows"]:
                if rule is not None:
                    failing.setdefault(i, []).append(rule)
        for i, row in enumerate(chunk):
            broken = failing.get(i)
            if broken:
                entry = removals.setdefault(row["shard"], {}).setdefault(
                    row["key"], {"id": row["id"], "reasons": [], "labels": []})
                for rule in broken:
                    if rule.reason not in entry["reasons"]:
                        entry["reasons"].append(rule.reason)
                    entry["labels"].append(rule.label())
                if row.get("id_first_at"):
                    entry["first_at"] = list(row["id_first_at"])
            else:
                sources[row["source"]] += 1
                speech["spoken"] += int(row.get("spoken") or 0)
                speech["typed"] += int(row.get("typed") or 0)
        chunk.clear()

    try:
        for (name,), res in (executor or LocalExecutor()).map_ordered(scan, payloads):
            shard_rows.append(res["shard"])
            shas[name] = res.get("sha256")
            if progress:
                progress(stage, len(shard_rows), n_samples + len(res["rows"]))
            if not all(v for k, v in res["shard"].items() if k != "shard"):
                damaged.add(name)  # quarantined whole below; its samples are not trusted
                continue
            rows = res["rows"]
            n_samples += len(rows)
            ids.first(rows)
            chunk.extend(rows)
            if len(chunk) >= chunk_rows:
                check_chunk()
        check_chunk()
    finally:
        ids.close()
    if shard_rows:
        shards_df = pd.DataFrame(shard_rows)
        for r in run_suite(ctx, stage, "shards", shard_suite(f"{stage}.shards"), shards_df, docs):
            results.append(r)
    mix = mix_table(out, stage, cfg, sources, speech)
    if mix is not None and len(mix):
        results += run_suite(ctx, stage, "mix", mix_suite(f"{stage}.mix"), mix, docs)
    if docs:
        ctx.build_data_docs(resource_identifiers=docs)

    shard_failures: dict[str, list[str]] = {}
    for row in shard_rows:
        if row["shard"] in damaged:
            shard_failures[row["shard"]] = [f"expect_column_values_to_be_in_set({k})"
                                            for k, v in row.items() if k != "shard" and not v]
    quarantined = [quarantine(out, stage, name, why)
                   for name, why in sorted(shard_failures.items())]
    repaired = [remove_samples(out, stage, name, removals[name])
                for name in sorted(removals) if name not in shard_failures]
    for entry in repaired:
        shas[entry["shard"]] = entry["sha256"]
    removed_by_reason: Counter[str] = Counter()
    for entry in repaired:
        removed_by_reason.update(entry["by_reason"])
    grains = {"samples": "sample", "shards": "shard", "mix": "mix"}
    failed = []
    for r in results:
        if r["success"]:
            continue
        f = {k: v for k, v in r.items() if k not in ("rows", "chunk")}
        f["grain"] = grains[r["table"]]
        f["action"] = {"sample": "samples_removed", "shard": "shard_quarantined",
                       "mix": "stage_failed"}[f["grain"]]
        if f["grain"] == "sample":
            rule = by_column.get(r["column"])
            f["reason"] = rule.reason if rule else None
        failed.append(f)
    failed = _merge_chunks(failed)
    verdict = {
        # An empty stage (its pools had no data) passes; training refuses it for being empty.
        # Samples that broke a per-sample rule are out of the shards now: they do not fail the
        # stage. A damaged shard or a data mix off its recipe does.
        "stage": stage, "passed": not any(f["grain"] != "sample" for f in failed),
        "validated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "samples": int(n_samples - sum(e["removed"] for e in repaired)),
        "samples_scanned": int(n_samples), "chunks": n_chunks, "max_tokens": max_tokens,
        "shards": {k: v for k, v in sorted(shas.items())
                   if k not in shard_failures and v is not None
                   and uri.exists(uri.join(folder, k))},
        "quarantined": quarantined,
        "removed_samples": {"count": sum(e["removed"] for e in repaired),
                            "by_reason": dict(sorted(removed_by_reason.items())),
                            "shards": repaired},
        "failed": failed,
        "expectations": len({(r["table"], r["expectation"], r["column"]) for r in results}),
        "data_docs": os.path.join(out, VALIDATION_DIR, "gx", "uncommitted", "data_docs",
                                  "local_site", "index.html"),
    }
    uri.write_bytes_atomic(uri.join(out, VALIDATION_DIR, f"{stage}.verdict.json"),
                           (json.dumps(verdict, indent=1) + "\n").encode())
    return verdict


def _merge_chunks(failed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per failed expectation, its unexpected counts summed over the chunks."""
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    for f in failed:
        k = (f["table"], f["expectation"], f["column"])
        if k in merged:
            merged[k]["unexpected_count"] += f.get("unexpected_count") or 0
        else:
            merged[k] = dict(f)
    return list(merged.values())


def stage_dirs(out: str, only: str | None = None) -> list[str]:
    names = [n for n in uri.listdir(out) if n.startswith("stage_")]
    if only:
        want = only if only.startswith("stage_") or only == "ingest" else f"stage_{only}"
        if want != "ingest" and want not in names:
            raise ValueError(f"no stage {only!r} in {out}; there are {names}")
        return [want]
    return names


def validate(out: str, stage: str | None = None, executor: Executor | None = None,
             chunk_rows: int = DEFAULT_CHUNK_ROWS, progress: ValidationProgress | None = None
             ) -> dict[str, dict[str, Any]]:
    return {s: validate_stage(out, s, executor, chunk_rows, progress)
            for s in stage_dirs(out, stage)}
