"""The validation gate: Great Expectations over what the shards really hold.

For each stage folder the tars are read (in parallel through an executor: in-process or Ray
Data), flattened to one metadata row per sample (no media kept) and one row per shard, and
validated with the suites in schemas.expectations, plus the stage's data mix. A shard that
fails a sample or shard expectation is moved to OUT/validation/quarantine/<stage>/ with a
`.failed.json` listing what it failed; nothing is deleted. The verdict (pass or fail, and the
sha256 of every shard it passed) goes to OUT/validation/<stage>.verdict.json and the Data Docs
to OUT/validation/gx/uncommitted/data_docs/local_site/index.html. `require_verdict` is what
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
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import numpy as np
import soundfile as sf
from PIL import Image

from flows.executors import Executor, LocalExecutor
from schemas.config import CorpusConfig, config_from_dict
from schemas.expectations import deviation_sigmas, mix_suite, sample_suite, shard_suite
from storage import uri
from storage.parts import REJECTS_DIR
from storage.shards import iter_samples, sha256_of
from transforms.video import sample_times

VALIDATION_DIR = "validation"
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
                           "source": "", "spoken": 0, "typed": 0}
    if not row["has_json"]:
        return row
    try:
        rec = json.loads(members["json"])
    except ValueError:
        row["has_json"] = False
        return row
    meta = rec.get("meta") or {}
    row["id"], row["source"] = str(rec.get("id")), str(meta.get("source", ""))
    turns = rec.get("conversations") or []
    roles = [t.get("from") for t in turns]
    row["turns_ok"] = (len(roles) >= 2 and roles[-1] == "gpt"
                       and all(r == ("human" if i % 2 == 0 else "gpt") for i, r in enumerate(roles)))
    ph = Counter(m.group(1) for t in turns for m in _PH.finditer(str(t.get("value", ""))))
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
        if Image.open(io.BytesIO(members[n])).size != (size, size):
            row["sizes_ok"] = False
    if frames:
        row["frames"] = len(frames)
        dur = video.get("duration_s") or 0
        row["frames_rule_ok"] = dur > 0 and len(frames) == len(sample_times(dur))
    if audio:
        want = pair_sr if meta.get("task") == "tts_pair" else speech_sr
        stats = [_rms_dbfs(members[n]) for n in audio]
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
        shard = {"shard": name, "sha256_ok": False, "size_ok": False, "count_ok": False}
        if not uri.exists(tar):
            return {"rows": [], "shard": shard}
        size, sha = sha256_of(tar)
        shard["sha256_ok"], shard["size_ok"] = sha == m["sha256"], size == m["bytes"]
        rows: list[dict[str, Any]] = []
        try:
            for key, members in iter_samples(tar):
                rows.append(sample_row(name, key, members, self.speech_sr, self.pair_sr))
        except Exception as err:  # a tar that does not even parse: every check on it fails
            rows.append({"shard": name, "key": f"<unreadable: {type(err).__name__}>",
                         "has_json": False, "id": f"{name}#unreadable", "members_ok": False,
                         "sizes_ok": False, "turns_ok": False})
        shard["count_ok"] = len(rows) == m["count"]
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


def _run_suite(ctx: Any, stage: str, table: str, suite: Any, df: Any) -> list[dict[str, Any]]:
    """Validate `df` with `suite`; return one entry per expectation with the failing rows."""
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
        actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs")],
        result_format={"result_format": "COMPLETE"}))
    res = cp.run(batch_parameters={"dataframe": df})
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


def validate_stage(out: str, stage: str, executor: Executor | None = None) -> dict[str, Any]:
    """Validate OUT/<stage>; quarantine failing shards; write and return the verdict."""
    import pandas as pd

    cfg = _saved_config(out)
    sp = cfg.transforms.speech
    folder = uri.join(out, stage)
    manifests = [json.loads(uri.read_bytes(uri.join(folder, n))) for n in uri.listdir(folder)
                 if n.endswith(".manifest.json")]
    payloads = [((m,), {"tar": uri.join(folder, m["shard"]), "manifest": m})
                for m in manifests if m["shard"]]
    scan = functools.partial(ShardScanner, cfg.transforms.audio.sample_rate, sp.pair_sample_rate)
    rows, shard_rows, shas = [], [], {}
    for (m,), res in (executor or LocalExecutor()).map_ordered(scan, payloads):
        rows += res["rows"]
        shard_rows.append(res["shard"])
        shas[m["shard"]] = res.get("sha256")
    samples = pd.DataFrame(rows)
    shards = pd.DataFrame(shard_rows)
    ctx = _context(out)
    results = []
    if len(samples):
        results += _run_suite(ctx, stage, "samples",
                              sample_suite(f"{stage}.samples", cfg.transforms.tiling,
                                           cfg.transforms.audio), samples)
    if len(shards):
        results += _run_suite(ctx, stage, "shards", shard_suite(f"{stage}.shards"), shards)
    mix = _mix_table(out, stage, cfg, samples)
    if mix is not None and len(mix):
        results += _run_suite(ctx, stage, "mix", mix_suite(f"{stage}.mix"), mix)
    failed_by_shard: dict[str, list[str]] = {}
    for r in results:
        if r["success"] or r["table"] == "mix":
            continue
        table = samples if r["table"] == "samples" else shards
        for i in r["rows"]:
            label = f"{r['expectation']}({r['column']})"
            failed_by_shard.setdefault(str(table.iloc[i]["shard"]), [])
            if label not in failed_by_shard[str(table.iloc[i]["shard"])]:
                failed_by_shard[str(table.iloc[i]["shard"])].append(label)
    quarantined = [quarantine(out, stage, name, why) for name, why in sorted(failed_by_shard.items())]
    verdict = {
        # An empty stage (its pools had no data) passes; training refuses it for being empty.
        "stage": stage, "passed": all(r["success"] for r in results),
        "validated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "samples": int(len(samples)), "shards": {k: v for k, v in sorted(shas.items())
                                                 if k not in failed_by_shard},
        "quarantined": quarantined,
        "failed": [{k: v for k, v in r.items() if k != "rows"} for r in results if not r["success"]],
        "expectations": len(results),
        "data_docs": os.path.join(out, VALIDATION_DIR, "gx", "uncommitted", "data_docs",
                                  "local_site", "index.html"),
    }
    uri.write_bytes_atomic(uri.join(out, VALIDATION_DIR, f"{stage}.verdict.json"),
                           (json.dumps(verdict, indent=1) + "\n").encode())
    return verdict


def _mix_table(out: str, stage: str, cfg: CorpusConfig, samples: Any) -> Any:
    """Rows per pool (and speech): requested vs achieved, from the tars and ingest manifests."""
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
    for n in uri.listdir(folder):
        if n.endswith(".manifest.json"):
            m = json.loads(uri.read_bytes(uri.join(folder, n)))
            available[kinds.get(m["source"], "?")] += m["count"]
    got = Counter(kinds.get(s, "?") for s in samples["source"]) if len(samples) else Counter()
    rows = []
    for pool, p in recipe["pools"].items():
        n = available[pool]
        ach = got[pool] / n if n else 0.0
        rows.append({"pool": pool, "requested": p["requested"], "achieved": ach, "n": n,
                     "deviation_sigmas": deviation_sigmas(p["requested"], ach, n)})
    if recipe.get("speech_fraction") and len(samples):
        spoken, typed = int(samples["spoken"].sum()), int(samples["typed"].sum())
        n = spoken + typed
        ach = spoken / n if n else 0.0
        rows.append({"pool": "speech", "requested": recipe["speech_fraction"], "achieved": ach,
                     "n": n, "deviation_sigmas": deviation_sigmas(recipe["speech_fraction"], ach, n)})
    return pd.DataFrame(rows)


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


def validate(out: str, stage: str | None = None, executor: Executor | None = None
             ) -> dict[str, dict[str, Any]]:
    return {s: validate_stage(out, s, executor) for s in stage_dirs(out, stage)}


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
