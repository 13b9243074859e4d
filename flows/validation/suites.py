"""Running Great Expectations: the file context under OUT/validation, one suite over one table
(a chunk of sample rows, the shard rows, the mix), and the mix table from running counts.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from typing import Any

import numpy as np

from flows.validation.scan import manifests
from schemas.config import CorpusConfig
from schemas.expectations import deviation_sigmas
from storage import uri
from storage.verdict import VALIDATION_DIR

log = logging.getLogger(__name__)


def _atomic_store_writes() -> None:
    """Make Great Expectations write its file stores (suites, validation definitions,
    checkpoints, results) and its project config atomically: to a temporary name, then
    renamed. GX writes them in place, so a full disk left a zero-byte checkpoint behind, and
    every later run failed on it ("was found, but it is not a Checkpoint")."""
    from great_expectations.data_context.data_context import file_data_context
    from great_expectations.data_context.store import tuple_store_backend

    backend = tuple_store_backend.TupleFilesystemStoreBackend
    if getattr(backend, "_vita_atomic", False):
        return

    def _set(self: Any, key: Any, value: Any, **kwargs: Any) -> Any:
        if not isinstance(key, tuple):
            key = key.to_tuple()
        path = os.path.join(self.full_base_directory, self._convert_key_to_filepath(key))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _write_atomic(path, value.encode("utf-8") if isinstance(value, str) else value)
        return path

    backend._set = _set
    backend._vita_atomic = True

    # great_expectations.yml: that module's open(path, "w") goes to a temporary name, renamed
    # into place when closed (the name `open` in that module only).
    file_data_context.open = _open_atomic


class _AtomicText:
    def __init__(self, path: str, mode: str, kwargs: dict[str, Any]) -> None:
        self.path, self.tmp = path, f"{path}.tmp-{os.getpid()}"
        self.f = open(self.tmp, mode, **kwargs)  # noqa: SIM115 - closed in __exit__

    def __enter__(self) -> Any:
        return self.f

    def __exit__(self, kind: Any, *_: Any) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        if kind is None:
            os.replace(self.tmp, self.path)
        else:
            os.remove(self.tmp)


def _open_atomic(file: Any, mode: str = "r", **kwargs: Any) -> Any:
    if "w" in mode:
        return _AtomicText(os.fspath(file), mode, kwargs)
    return open(file, mode, **kwargs)  # noqa: SIM115 - the caller's `with` closes it


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def repair_gx_state(root: str) -> list[str]:
    """Remove the files of Great Expectations' state under `root` (OUT/validation/gx) that are
    empty or do not parse (a write cut short by a full disk or a kill), and temporary files
    left by a killed write; return them. What they held is made again: each run adds or
    updates its suites, validation definitions and checkpoints before it uses them."""
    import yaml

    removed = []
    if not os.path.isdir(root):
        return removed
    for folder, dirs, files in os.walk(root):
        if "data_docs" in dirs:
            dirs.remove("data_docs")  # rendered HTML, rebuilt from the results
        for name in files:
            path = os.path.join(folder, name)
            damaged = ".tmp-" in name
            if not damaged and name != ".gitignore":
                try:
                    with open(path, "rb") as f:
                        data = f.read()
                    if not data.strip():  # what a full disk leaves
                        damaged = True
                    elif name.endswith(".json"):
                        json.loads(data)
                    elif name == "great_expectations.yml":
                        damaged = not isinstance(yaml.safe_load(data), dict)
                    elif name.endswith((".yml", ".yaml")):
                        yaml.safe_load(data)  # config_variables.yml is all comments
                except (ValueError, yaml.YAMLError, UnicodeDecodeError):
                    damaged = True
            if damaged:
                os.remove(path)
                removed.append(os.path.relpath(path, root))
    if removed:
        log.warning("Great Expectations state in %s: removed %d damaged file(s), made again "
                    "by this run: %s", root, len(removed), ", ".join(removed[:10]))
    return removed


def gx_context(out: str) -> Any:
    import great_expectations as gx

    root = os.path.join(out, VALIDATION_DIR)
    os.makedirs(root, exist_ok=True)
    _atomic_store_writes()
    repair_gx_state(os.path.join(root, "gx"))
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
