"""The ingest build: every source, read -> check -> shard, resumable, with its accounting.

This process plans (flows.build.plan.SourcePlanner: reads each source, decides duplicate ids,
cuts the inputs into partitions of whole ranges; what a quick check proves will parse goes out
as raw text, storage.readers' light read); the executor runs each partition's work
(flows.build.partitions.write_partition: make and transform the records, write the ranges'
parts to OUT) in this process or on Ray workers; the results come back as counts, and the
planner checks that every input read is in exactly one part. Part boundaries depend only on
the inputs and the config, so the parts are the same bytes whichever executor ran, and a rerun
keeps the leading ranges whose parts still match and builds the rest; an appended source
costs only its new ranges (and its last one again).
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from flows.build.content import dedupe_entry, open_decider
from flows.build.executors import Executor, LocalExecutor
from flows.build.partitions import write_partition
from flows.build.plan import (
    DEFAULT_STAGE,
    BuildError,
    Partition,
    SourcePlanner,
    SourceStats,
    range_size,
    source_fingerprint,
)
from flows.build.stages import StageProgress, build_stage
from flows.report.mix import write_report
from schemas.config import CorpusConfig, dump_config
from schemas.manifest import AccountingError
from schemas.recipes import StageRecipe, max_tokens_for
from schemas.rejects import Rejected
from schemas.version import code_version
from storage import uri
from storage.lock import out_lock
from storage.parts import REJECTS_DIR

__all__ = ["DEFAULT_STAGE", "BuildError", "SourceStats", "build", "finish", "ingest", "prepare",
           "source_fingerprint"]

# (source, inputs, written, rejected, final): called as partitions finish and once at the end
Progress = Callable[[str, int, int, int, bool], None]


def ingest(cfg: CorpusConfig, out: str, stage: str = DEFAULT_STAGE, overwrite: bool = False,
           progress: Progress | None = None, executor: Executor | None = None,
           sources: list[str] | None = None, ranges_per_partition: int = 1,
           dedupe: dict[str, Any] | None = None) -> tuple[list[SourceStats], dict[str, int]]:
    """Ingest `sources` (default: all) of `cfg` into `out/<stage>/`; (stats, tts counters).
    Each source's stats carry `work`: what its partitions' writers did (tasks, records,
    transforms, their CPU seconds and peak memory). `dedupe`, when given, receives the content
    decisions' summary (flows.build.content)."""
    executor = executor or LocalExecutor()
    uri.makedirs(uri.join(out, stage))
    uri.makedirs(uri.join(out, REJECTS_DIR))
    chosen = [s for s in cfg.sources if sources is None or s.name in sources]
    planners: list[SourcePlanner] = []
    fn = functools.partial(write_partition, cfg, out, stage=stage)
    decider = open_decider(cfg, out, stage)

    def stream() -> Iterator[tuple[tuple[SourcePlanner, int, int], Partition]]:
        # Planned source by source as the executor asks for more, so the next source's reading
        # overlaps the last partitions of the one before.
        for src in chosen:
            planner = SourcePlanner(cfg, src, out, stage, overwrite, content=decider)
            planners.append(planner)
            for part in planner.partitions(ranges_per_partition):
                yield (planner, part.start, part.end), part

    current: SourcePlanner | None = None
    try:
        for (planner, start, end), result in executor.map_tasks(fn, stream()):
            current = planner
            planner.add(start, end, result)
            if progress:
                st = planner.stats
                progress(st.name, st.inputs, st.written, st.rejected, False)
        stats = []
        for planner in planners:
            current = planner
            st = planner.finish()
            st.work = dict(planner.work)
            stats.append(st)
            if progress:
                progress(st.name, st.inputs, st.written, st.rejected, True)
        if decider is not None and dedupe is not None:
            dedupe.update(decider.report())
    except (Rejected, AccountingError, BuildError):
        for planner in planners:
            planner.abort()
        raise
    except Exception as err:
        for planner in planners:
            planner.abort()
        where = f"source {current.src.name!r}: " if current else ""
        raise BuildError(f"{where}unexpected {type(err).__name__}: {err}") from err
    finally:
        if decider is not None:
            decider.close()
    tts = {k: sum(p.tts[k] for p in planners) for k in ("synthesis_calls", "cache_hits")}
    return stats, tts


def stage_progress(progress: Progress | None) -> StageProgress | None:
    """A stage's progress for `progress`: its own `stage` method where it has one (the
    terminal's shows the speech counts), else a row with the samples written."""
    if progress is None:
        return None
    own = getattr(progress, "stage", None)
    if own is not None:
        return own

    def rows(stage: str, written: int, planned: int, speech: dict[str, int], final: bool) -> None:
        progress(stage, planned, written, 0, final)

    return rows


def partitions_report(stats: list[SourceStats], ranges: int, size: int) -> dict[str, Any]:
    """The build report's `partitions` entry: how the sources were cut and what the writers
    did."""
    return {"range_inputs": size, "ranges_per_partition": ranges,
            "sources": {st.name: st.work for st in stats}}


def prepare(cfg: CorpusConfig, out: str, stage: str = DEFAULT_STAGE,
            stages: list[StageRecipe] | None = None) -> CorpusConfig:
    """Set OUT up for a build: folders, leftovers of a killed run removed, the config saved.
    With stages, speech questions come from the recipes (2.2), so the ingest pool is unspoken."""
    if stages:
        cfg = cfg.model_copy(deep=True)
        cfg.transforms.speech.enabled = False
    if cfg.sample.max_tokens is None:
        # The budget the contract checks, fixed in the saved config so that the ingest, the
        # gate and a later rerun agree on it: the longest max_len of the stages built.
        cfg = cfg.model_copy(deep=True)
        cfg.sample.max_tokens = max_tokens_for(None, stages or None)
    for folder in (uri.join(out, stage), uri.join(out, REJECTS_DIR)):
        uri.makedirs(folder)
        uri.remove_stale_temps(folder)
    uri.write_bytes_atomic(uri.join(out, "corpus.yaml"), dump_config(cfg).encode())
    return cfg


def finish(cfg: CorpusConfig, out: str, stage: str, started: float, stats: list[SourceStats],
           tts: dict[str, int], stage_summaries: dict[str, dict[str, Any]],
           extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the build report (with `extra`'s entries) and the data-mix report; return the
    build report."""
    report = {
        "corpus": cfg.name,
        "stage": stage,
        "config_fingerprint": cfg.fingerprint(),
        "code_version": code_version(),
        "started": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
        # two builds can start in the same second (a resumed nightly build takes less)
        "run": uuid.uuid4().hex[:16],
        "sources": {st.name: st.to_json() for st in stats},
        "totals": {
            "inputs": sum(s.inputs for s in stats),
            "written": sum(s.written for s in stats),
            "rejected": sum(s.rejected for s in stats),
            "shard_bytes": sum(s.shard_bytes for s in stats),
            "parts": sum(s.parts for s in stats),
        },
    }
    report["accounted"] = all(v["accounted"] for v in report["sources"].values())
    # Inputs whose reading or transforming raised something unexpected: each is rejected
    # `internal_error` with the exception, and the CLI exits 1 when there are any.
    report["internal_errors"] = sum(s.reasons.get("internal_error", 0) for s in stats)
    tts = dict(tts)
    for st in stage_summaries.values():
        for k in ("synthesis_calls", "cache_hits"):
            tts[k] += st["tts"][k]
    report["tts"] = tts
    report["stages"] = stage_summaries
    report.update(extra or {})
    report["duration_s"] = round(time.time() - started, 3)
    uri.write_bytes_atomic(uri.join(out, "report", "build_report.json"),
                           (json.dumps(report, indent=2) + "\n").encode())
    write_report(out, build=report)  # and the build's row in the history
    return report


def build(cfg: CorpusConfig, out: str, stage: str = DEFAULT_STAGE, overwrite: bool = False,
          progress: Progress | None = None, executor: Executor | None = None,
          stages: list[StageRecipe] | None = None) -> dict[str, Any]:
    """Build every source of `cfg` into `out/<stage>/`, then the `stages` from those shards;
    write and return the build report. (flows.nightly runs the same steps as Prefect tasks.)
    Holds OUT's lock (storage.lock) throughout: another process writing OUT raises OutLocked."""
    started = time.time()
    with out_lock(out, "vita-corpus build"):
        cfg = prepare(cfg, out, stage, stages)
        decisions: dict[str, Any] = {}
        stats, tts = ingest(cfg, out, stage, overwrite, progress, executor, dedupe=decisions)
        summaries = {r.stage: build_stage(cfg, out, r, ingest_stage=stage,
                                          progress=stage_progress(progress), executor=executor)
                     for r in stages or []}
        return finish(cfg, out, stage, started, stats, tts, summaries,
                      extra={"partitions": partitions_report(stats, 1, range_size(cfg)),
                             "dedupe": dedupe_entry(cfg, out, stage, decisions or None,
                                                    [s.work for s in stats])})
