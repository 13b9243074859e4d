"""Running Great Expectations: the file context under OUT/validation, one suite over one table
(a chunk of sample rows, the shard rows, the mix), and the mix table from running counts.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

import numpy as np

from flows.validation.scan import manifests
from schemas.config import CorpusConfig
from schemas.expectations import deviation_sigmas
from storage import uri
from storage.verdict import VALIDATION_DIR


def gx_context(out: str) -> Any:
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


def run_suite(ctx: Any, stage: str, table: str, suite: Any, df: Any,
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


def mix_table(out: str, stage: str, cfg: CorpusConfig, sources: Counter[str],
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
    for m in manifests(folder):
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
