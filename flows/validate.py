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
OUT/validation/gx/uncommitted/data_docs/local_site/index.html. `require_verdict` is what
training calls before it reads a stage.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import re
import shutil
import sqlite3
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import numpy as np
import soundfile as sf
from PIL import Image

from flows.executors import Executor, LocalExecutor
from schemas.config import CorpusConfig, config_from_dict
from schemas.contract import Rule, record_columns, sample_rules
from schemas.expectations import deviation_sigmas, mix_suite, sample_suite, shard_suite
from schemas.manifest import ShardManifest
from schemas.recipes import max_tokens_for
from schemas.rejects import REASONS, RejectRecord
from storage import uri
from storage.parts import REJECTS_DIR
from storage.shards import TarShardWriter, iter_samples, sha256_of
from transforms.video import sample_times

VALIDATION_DIR = "validation"
DEFAULT_CHUNK_ROWS = 50_000  # sample rows checked by one Great Expectations run
_PH = re.compile(r"<(image|video|audio)>")


class ValidationRequired(RuntimeError):
    """A stage has no passing verdict for the shards that are there now."""


def _rms_dbfs(data: bytes) -> tuple[int, float, float]:
    x, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0
    return sr, x.shape[0] / sr if sr else 0.0, 20 * math.log10(rms) if rms > 0 else -200.0


def sample_row(shard: str, key: str, members: dict[str, bytes], speech_sr: int,
               pair_sr: int) -> dict[str, Any]:
    """One sample's metadata as the validation table needs it, read from its members."""
    row: dict[str, Any] = {"shard": shard, "key": key, "has_json": "json" in members,
                           "id": key, "members_ok": False, "tiles_min": None,
                           "tiles_max": None, "sizes_ok": True, "frames": None,
                           "frames_rule_ok": None, "audio_rate_ok": None, "audio_min_s": None,
                           "audio_max_s": None, "audio_min_dbfs": None, "turns_ok": False,
                           "turns_nonempty": False, "placeholders_ok": False, "tokens": None,
                           "source": "", "spoken": 0, "typed": 0}
    if not row["has_json"]:
        return row
    try:
        rec = json.loads(members["json"])
        if not isinstance(rec, dict):
            raise ValueError("not an object")
    except ValueError:
        row["has_json"] = False
        return row
    meta = rec.get("meta") or {}
    row["id"], row["source"] = str(rec.get("id")), str(meta.get("source", ""))
    row.update(record_columns(rec))  # turn order, empty turns, placeholders, tokens
    turns = rec.get("conversations") or []
    ph = Counter(m.group(1) for t in turns if isinstance(t, dict)
                 for m in _PH.finditer(str(t.get("value", ""))))
    names = sorted(members)
    tiles = [n for n in names if n.startswith("tile_")]
    frames = [n for n in names if n.startswith("frame_")]
    audio = [n for n in names if n.startswith("audio_")]
    images = rec.get("image") or []
    images = [images] if isinstance(images, str) else images
    tiling = (meta.get("tiling") or {}).get("images", [])
    per_image = [i.get("tiles", 0) for i in tiling]
    size = ((meta.get("tiling") or {}).get("params") or {}).get("image_size", 448)
    image_ok = (len(images) == ph["image"]
                and (len(per_image) == len(images) and sum(per_image) == len(tiles)
                     if tiles or per_image else
                     len([n for n in names if n.startswith("image_")]) == len(images)))
    video = meta.get("video") or {}
    video_ok = (ph["video"] == (1 if rec.get("video") else 0)
                and (len(frames) == video.get("frames", 0) if frames or video else True))
    audio_ok = len(audio) == len(rec.get("audio") or []) == ph["audio"]
    row["members_ok"] = bool(image_ok and video_ok and audio_ok)
    if per_image:
        row["tiles_min"], row["tiles_max"] = min(per_image), max(per_image)
    for n in tiles + frames:
        try:
            ok = Image.open(io.BytesIO(members[n])).size == (size, size)
        except Exception:  # noqa: BLE001 - an undecodable tile is a failing sample, not a crash
            ok = False
        row["sizes_ok"] = row["sizes_ok"] and ok
    if frames:
        row["frames"] = len(frames)
        dur = video.get("duration_s") or 0
        row["frames_rule_ok"] = dur > 0 and len(frames) == len(sample_times(dur))
    if audio:
        want = pair_sr if meta.get("task") == "tts_pair" else speech_sr
        try:
            stats = [_rms_dbfs(members[n]) for n in audio]
        except Exception:  # noqa: BLE001 - undecodable audio fails the rate check
            stats = [(0, 0.0, -200.0)]
        row["audio_rate_ok"] = all(sr == want for sr, _, _ in stats)
        row["audio_min_s"] = min(d for _, d, _ in stats)
        row["audio_max_s"] = max(d for _, d, _ in stats)
        row["audio_min_dbfs"] = min(db for _, _, db in stats)
    sp = meta.get("speech") or {}
    row["spoken"], row["typed"] = int(sp.get("spoken", 0)), int(sp.get("typed", 0))
    return row


class ShardScanner:
    """Executor work: one shard -> its sample rows and its shard row."""

    def __init__(self, speech_sr: int, pair_sr: int) -> None:
        self.speech_sr, self.pair_sr = speech_sr, pair_sr

    def __call__(self, payload: dict[str, Any]) -> dict[str, Any]:
        tar, m = payload["tar"], payload["manifest"]
        name = m["shard"]
        shard = {"shard": name, "sha256_ok": False, "size_ok": False, "count_ok": False,
                 "members_match_manifest": False}
        if not uri.exists(tar):
            return {"rows": [], "shard": shard}
        size, sha = sha256_of(tar)
        shard["sha256_ok"], shard["size_ok"] = sha == m["sha256"], size == m["bytes"]
        rows: list[dict[str, Any]] = []
        found: list[tuple[str, list[str]]] = []
        try:
            for key, members in iter_samples(tar):
                found.append((key, sorted(members)))
                rows.append(sample_row(name, key, members, self.speech_sr, self.pair_sr))
        except Exception as err:  # a tar that does not even parse: every check on it fails
            rows.append({"shard": name, "key": f"<unreadable: {type(err).__name__}>",
                         "has_json": False, "id": f"{name}#unreadable", "members_ok": False,
                         "sizes_ok": False, "turns_ok": False})
            found.append(("", []))
        shard["count_ok"] = len(rows) == m["count"]
        # The tar holds exactly the samples and members its manifest lists (a member lost
        # after the write is the shard's damage, not the sample's fault).
        listed = [(e["key"], sorted(e["members"])) for e in m.get("samples", [])]
        shard["members_match_manifest"] = found == listed
        return {"rows": rows, "shard": shard, "sha256": sha}


def _context(out: str) -> Any:
    import great_expectations as gx

    root = os.path.join(out, VALIDATION_DIR)
    os.makedirs(root, exist_ok=True)
    ctx = gx.get_context(mode="file", project_root_dir=root)
    try:  # GX draws a progress bar per metric; a build log wants none
        from great_expectations.data_context.types.base import ProgressBarsConfig

        ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
        ctx.variables.save()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass
    return ctx


def _run_suite(ctx: Any, stage: str, table: str, suite: Any, df: Any,
               made: list[Any] | None = None) -> list[dict[str, Any]]:
    """Validate `df` with `suite`; return one entry per expectation with the failing rows.
    The validation results' ids are appended to `made`: the Data Docs are rendered for them
    once, after the last chunk (rendering per run would cost seconds per chunk)."""
    import great_expectations as gx

    ds = ctx.data_sources.add_or_update_pandas(name="vita_corpus")
    asset_name = f"{stage}.{table}"
    try:
        asset = ds.get_asset(asset_name)
    except LookupError:
        asset = ds.add_dataframe_asset(name=asset_name)
    try:
        bd = asset.get_batch_definition("all")
    except (KeyError, LookupError):
        bd = asset.add_batch_definition_whole_dataframe("all")
    suite = ctx.suites.add_or_update(suite)
    vd = ctx.validation_definitions.add_or_update(
        gx.ValidationDefinition(name=f"{asset_name}.validation", data=bd, suite=suite))
    cp = ctx.checkpoints.add_or_update(gx.Checkpoint(
        name=f"{asset_name}.checkpoint", validation_definitions=[vd],
        actions=[], result_format={"result_format": "COMPLETE"}))
    res = cp.run(batch_parameters={"dataframe": df})
    if made is not None:
        made.extend(res.run_results)
    out = []
    for vr in res.run_results.values():
        for r in vr.results:
            cfg = r.expectation_config
            idx = (r.result or {}).get("unexpected_index_list") or []
            out.append({"table": table, "expectation": cfg.type,
                        "column": cfg.kwargs.get("column"), "success": bool(r.success),
                        "unexpected_count": (r.result or {}).get("unexpected_count", 0),
                        "rows": [int(i) for i in idx if isinstance(i, int | np.integer)]})
    return out


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


def _manifests(folder: str) -> Iterator[dict[str, Any]]:
    """The stage's manifests, one at a time (a big stage has thousands)."""
    for n in sorted(uri.listdir(folder)):
        if n.endswith(".manifest.json"):
            yield json.loads(uri.read_bytes(uri.join(folder, n)))


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
                for m in _manifests(folder) if m["shard"])
    scan = functools.partial(ShardScanner, cfg.transforms.audio.sample_rate, sp.pair_sample_rate)
    ctx = _context(out)
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
        for r in _run_suite(ctx, stage, "samples", suite, df, docs):
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
        for r in _run_suite(ctx, stage, "shards", shard_suite(f"{stage}.shards"), shards_df, docs):
            results.append(r)
    mix = _mix_table(out, stage, cfg, sources, speech)
    if mix is not None and len(mix):
        results += _run_suite(ctx, stage, "mix", mix_suite(f"{stage}.mix"), mix, docs)
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


def _mix_table(out: str, stage: str, cfg: CorpusConfig, sources: Counter[str],
               speech: Counter[str]) -> Any:
    """Rows per pool (and speech): requested vs achieved, from the kept samples' counts and
    the ingest manifests."""
    import pandas as pd

    path = uri.join(out, "report", "build_report.json")
    if not stage.startswith("stage_") or not uri.exists(path):
        return None
    recipe = (json.loads(uri.read_bytes(path)).get("stages") or {}).get(stage[len("stage_"):])
    if not recipe:
        return None
    kinds = {s.name: s.kind for s in cfg.sources}
    available: Counter[str] = Counter()
    folder = uri.join(out, "ingest")
    for m in _manifests(folder):
        available[kinds.get(m["source"], "?")] += m["count"]
    got: Counter[str] = Counter()
    for source, n in sources.items():
        got[kinds.get(source, "?")] += n
    rows = []
    for pool, p in recipe["pools"].items():
        n = available[pool]
        ach = got[pool] / n if n else 0.0
        rows.append({"pool": pool, "requested": p["requested"], "achieved": ach, "n": n,
                     "deviation_sigmas": deviation_sigmas(p["requested"], ach, n)})
    if recipe.get("speech_fraction") and sum(sources.values()):
        n = speech["spoken"] + speech["typed"]
        ach = speech["spoken"] / n if n else 0.0
        rows.append({"pool": "speech", "requested": recipe["speech_fraction"], "achieved": ach,
                     "n": n, "deviation_sigmas": deviation_sigmas(recipe["speech_fraction"], ach, n)})
    return pd.DataFrame(rows)


def _member_kind(suffix: str) -> str:
    return suffix.split("_", 1)[0].split(".", 1)[0]


def remove_samples(out: str, stage: str, shard: str, failing: dict[str, dict[str, Any]]
                   ) -> dict[str, Any]:
    """Rewrite `shard` without the `failing` samples (key -> id, reasons, labels).

    The original tar and manifest are copied to the quarantine first (nothing is lost), the
    removed samples become reject lines with the rule's reason, and the manifest is rewritten
    last: its accounting still holds (count + rejected == inputs).
    """
    base = shard[: -len(".tar")]
    folder = uri.join(out, stage)
    dest = os.path.join(out, VALIDATION_DIR, "quarantine", stage)
    os.makedirs(dest, exist_ok=True)
    mpath = uri.join(folder, f"{base}.manifest.json")
    m = ShardManifest.from_json_bytes(uri.read_bytes(mpath))
    k = 0  # a shard repaired twice keeps both originals
    while os.path.exists(os.path.join(dest, f"{base}{f'.{k}' if k else ''}.tar")):
        k += 1
    kept_as = f"{base}{f'.{k}' if k else ''}"
    for name, to in ((shard, f"{kept_as}.tar"), (f"{base}.manifest.json", f"{kept_as}.manifest.json")):
        shutil.copyfile(os.path.join(out, stage, name), os.path.join(dest, to))
    entries = {e.key: e for e in m.samples}
    kept, rejects = [], []
    writer = TarShardWriter(uri.join(folder, shard))
    try:
        for key, members in iter_samples(uri.join(folder, shard)):
            bad = failing.get(key)
            if bad is None:
                writer.write_sample(key, [(s, members[s]) for s in entries[key].members])
                kept.append(entries[key])
                continue
            lineage = ""
            try:
                lineage = str((json.loads(members.get("json", b"{}")).get("meta") or {})
                              .get("lineage", ""))
            except ValueError:
                pass
            detail = "the validation gate: " + "; ".join(bad["labels"])
            if bad.get("first_at"):
                detail += f" (first in {bad['first_at'][0]} as {bad['first_at'][1]})"
            e = entries.get(key)
            rejects.append(RejectRecord(
                source=m.source, index=e.index if e else -1, lineage=lineage,
                reason=bad["reasons"][0] if bad["reasons"][0] in REASONS else "sample_unreadable",
                detail=detail[:1000], id=bad["id"],
                raw=members.get("json", b"").decode("utf-8", "replace")[:2048]))
        if kept:
            size, sha = writer.close()
        else:
            writer.abort()
            uri.remove(uri.join(folder, shard))
            size, sha = 0, None
    except BaseException:
        writer.abort()
        raise
    rel = f"{base}.rejects.jsonl" if stage == "ingest" else f"{stage}/{base}.rejects.jsonl"
    rpath = uri.join(out, REJECTS_DIR, rel)
    old = uri.read_bytes(rpath) if m.rejects_file and uri.exists(rpath) else b""
    lines = "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in rejects)
    if stage != "ingest":
        uri.makedirs(uri.join(out, REJECTS_DIR, stage))
    uri.write_bytes_atomic(rpath, old + lines.encode("utf-8"))
    members: Counter[str] = Counter(_member_kind(s) for e in kept for s in e.members)
    reasons = Counter(m.reject_reasons)
    reasons.update(r.reason for r in rejects)
    m = m.model_copy(update={
        "shard": shard if kept else None, "count": len(kept), "bytes": size, "sha256": sha,
        "samples": kept, "rejected": m.rejected + len(rejects),
        "reject_reasons": dict(sorted(reasons.items())), "rejects_file": rel,
        "member_counts": dict(sorted(members.items()))})
    uri.write_bytes_atomic(mpath, m.to_json_bytes())
    entry = {"shard": shard, "stage": stage, "removed": len(rejects), "kept": len(kept),
             "by_reason": dict(Counter(r.reason for r in rejects)), "sha256": sha,
             "samples": [{"key": k, "id": v["id"], "reasons": v["reasons"]}
                         for k, v in sorted(failing.items())][:100],
             "original": os.path.join(dest, f"{kept_as}.tar"),
             "removed_at": datetime.now(UTC).isoformat(timespec="seconds")}
    with open(os.path.join(dest, f"{kept_as}.removed.json"), "w") as f:
        json.dump(entry, f, indent=1)
    return entry


def quarantine(out: str, stage: str, shard: str, failed: list[str]) -> dict[str, Any]:
    """Move a shard and its manifest aside (never delete), with what it failed."""
    base = shard[: -len(".tar")]
    dest = os.path.join(out, VALIDATION_DIR, "quarantine", stage)
    os.makedirs(dest, exist_ok=True)
    for name in (shard, f"{base}.manifest.json"):
        src = os.path.join(out, stage, name)
        if os.path.exists(src):
            shutil.move(src, os.path.join(dest, name))
    rej = os.path.join(out, REJECTS_DIR, f"{base}.rejects.jsonl")
    if stage == "ingest" and os.path.exists(rej):
        shutil.move(rej, os.path.join(dest, f"{base}.rejects.jsonl"))
    marker = os.path.join(out, stage, "_stage.json")
    if os.path.exists(marker):
        os.remove(marker)  # the stage is no longer whole: the next build rebuilds it
    entry = {"shard": shard, "stage": stage, "failed": failed,
             "quarantined_at": datetime.now(UTC).isoformat(timespec="seconds")}
    with open(os.path.join(dest, f"{base}.failed.json"), "w") as f:
        json.dump(entry, f, indent=1)
    return entry


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


def require_verdict(out: str, stage: str) -> dict[str, Any]:
    """The stage's verdict, if it passed and still matches the shards on disk; else raise."""
    stage = stage if stage.startswith("stage_") else f"stage_{stage}"
    path = uri.join(out, VALIDATION_DIR, f"{stage}.verdict.json")
    if not uri.exists(path):
        raise ValidationRequired(f"{out}/{stage} has not been validated: run "
                                 f"`vita-corpus validate {out} --stage {stage[6:]}`")
    verdict = json.loads(uri.read_bytes(path))
    if not verdict.get("passed"):
        raise ValidationRequired(f"{out}/{stage} failed validation ({len(verdict['failed'])} "
                                 f"expectations); see {verdict['data_docs']}")
    if not verdict.get("samples"):
        raise ValidationRequired(f"{out}/{stage} holds no samples: its pools had no data")
    now = {n: sha256_of(uri.join(out, stage, n))[1] for n in uri.listdir(uri.join(out, stage))
           if n.endswith(".tar")}
    if now != verdict["shards"]:
        changed = sorted(set(now.items()) ^ set(verdict["shards"].items()))
        raise ValidationRequired(f"{out}/{stage} changed since it was validated "
                                 f"({len(changed)} shard entries differ); validate it again")
    return verdict
