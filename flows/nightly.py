"""The Prefect flow of a corpus build: a task per partition (transforms and parts), a task per
stage part, validation, report.

This process plans each source (flows.build.plan.SourcePlanner: reads the inputs, decides
duplicate ids, cuts them into partitions of whole ranges, handing out raw text where a quick
check proves the record will parse) and submits a task per partition; the task, on a Ray
worker, makes and transforms the partition's records and writes its ranges'
parts (tar, rejects, manifest) straight to OUT, then returns their counts, which this process
adds up and checks. Each stage is planned here too (flows.build.stages.StagePlanner) and each
of its parts is a task (it reads the chosen samples, speaks stage 2.2's questions with the
worker's TTS backend, loaded once per worker, and writes the part); each stage's validation
is a task; every task has retries and backoff, and runs on Ray through prefect-ray's
RayTaskRunner (a local Ray started for the run, or `ray_address` / RAY_ADDRESS for a cluster).
A partition task that is retried clears its own ranges and writes them again; a flow run after
a crash keeps the leading ranges whose parts are committed and match (see
flows.build.partitions) and the stage parts already committed, so reruns end with exactly the
samples of an uninterrupted run. A partition task that fails for good is written by this
process itself (the same function), and the report says so.

Partition tasks are submitted in input order (sources in config order), one more than Ray has
CPUs at a time, so that a worker that finishes finds the next partition queued and this process
holds only those partitions' inputs.
"""

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

from flows.build.content import dedupe_entry, open_decider
from flows.build.partitions import write_partition
from flows.build.pipeline import DEFAULT_STAGE, SourceStats, finish, partitions_report, prepare
from flows.build.plan import Partition, SourcePlanner, range_size
from flows.build.stages import (
    StagePartition,
    StagePlanner,
    gpu_options,
    speech_progress,
    write_stage_partition,
)
from flows.prefect_server import PendingServer, start_in_background
from schemas.config import CorpusConfig, load_config
from schemas.recipes import StageRecipe, load_recipes, select_stages
from storage.lock import holds_out_lock

RETRY_DELAYS = [10, 60, 300]  # seconds: backoff between a task's attempts
DEFAULT_SIZE = 500  # inputs per partition task, rounded up to whole ranges


@task(retries=len(RETRY_DELAYS), retry_delay_seconds=RETRY_DELAYS, cache_policy=NO_CACHE,
      task_run_name="transform {source} inputs {start}-{end}")
def transform_task(cfg_json: dict[str, Any], out: str, source: str, start: int, end: int,
                   inputs: bytes) -> dict[str, Any]:
    """Transform inputs [start, end) of `source` and write their ranges' parts to OUT. The
    inputs come pickled, one parameter that Prefect does not walk element by element."""
    t0 = time.monotonic()
    cfg = CorpusConfig.model_validate(cfg_json)
    result = write_partition(cfg, out, Partition(source, start, end, pickle.loads(inputs)))
    st = result["stats"]
    get_run_logger().info("%s inputs %d-%d: %d written, %d rejected in %d parts, %d records "
                          "transformed, in %.1f s", source, start, end, st["written"],
                          st["rejected"], st["parts"], result["transformed"],
                          time.monotonic() - t0)
    return result


@task(retries=len(RETRY_DELAYS), retry_delay_seconds=RETRY_DELAYS, cache_policy=NO_CACHE,
      task_run_name="stage {stage_id} part {part}")
def stage_part_task(cfg_json: dict[str, Any], out: str, recipe_json: dict[str, Any],
                    stage_id: str, part: str, plan: bytes) -> dict[str, Any]:
    """Write one stage part (its chosen samples, their speech) to OUT; the plan comes pickled,
    one parameter that Prefect does not walk key by key."""
    cfg = CorpusConfig.model_validate(cfg_json)
    result = write_stage_partition(cfg, out, StageRecipe.model_validate(recipe_json),
                                   pickle.loads(plan))
    tts = result["tts"]
    get_run_logger().info("stage %s part %s: %d samples, %d questions synthesized, %d from the "
                          "cache, in %.1f s", stage_id, part, result["count"],
                          tts["synthesis_calls"], tts["cache_hits"], result["seconds"])
    return result


@task(retries=1, retry_delay_seconds=30, task_run_name="validate {stage}")
def validate_task(out: str, stage: str) -> dict[str, Any]:
    from flows.validation.gate import validate_stage

    return validate_stage(out, stage)


def _outcome(future: Any) -> Any:
    """A task's result, or its error: what it raised, or why its Ray worker is gone (a worker
    that died more often than Ray retries a task raises here rather than in the task)."""
    try:
        return future.result(raise_on_failure=False)
    except Exception as err:
        return err


def _task_slots() -> int:
    """Partition tasks to keep submitted at once: one more than Ray's CPUs, so that a worker
    that finishes finds the next partition queued, and no more: this process holds each
    submitted partition's inputs until its task ends (to write it itself if the task fails
    for good), and Ray starts queued tasks of prefect-ray in no fixed order."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else os.cpu_count()
    return (cpus or 1) + 1


def _ingest_tasks(cfg: CorpusConfig, cfg_json: dict[str, Any], out: str, size: int,
                  dedupe: dict[str, Any] | None = None
                  ) -> tuple[list[SourceStats], dict[str, int], int]:
    """Plan every source and submit its partition tasks in input order, a window at a time;
    account for each as it ends. Returns (stats per source, tts counters, ranges per task);
    `dedupe` receives the content decisions' summary."""
    ranges = max(1, -(-size // range_size(cfg)))
    planners: list[SourcePlanner] = []
    decider = open_decider(cfg, out, DEFAULT_STAGE)

    def planned() -> Iterator[tuple[SourcePlanner, Partition]]:
        for src in cfg.sources:
            planner = SourcePlanner(cfg, src, out, content=decider)
            planner.work.update(failed=0, written_by_flow=0)
            planners.append(planner)
            n = 0
            for p in planner.partitions(ranges):
                n += 1
                yield planner, p
            print(f"{src.name}: {n} partition task{'' if n == 1 else 's'} of up to "
                  f"{ranges * planner.size} inputs")

    queue, in_flight, ended = planned(), {}, 0
    try:
        while True:
            # Until a partition has ended the workers are still starting (or warming up): a
            # task queued beyond their number could start before an earlier one.
            slots = _task_slots() - (0 if ended else 1)
            while len(in_flight) < slots and (nxt := next(queue, None)) is not None:
                planner, p = nxt
                f = transform_task.submit(cfg_json, out, p.source, p.start, p.end,
                                          pickle.dumps(p.inputs, protocol=5))
                in_flight[f] = (planner, p)
            if not in_flight:
                break
            f = next(as_completed(list(in_flight)))
            planner, p = in_flight.pop(f)
            ended += 1
            result = _outcome(f)
            if not isinstance(result, dict):
                # Failed for good (its retries spent, or its worker gone): the same function
                # here, which clears the range first; an error in the data fails here too.
                get_run_logger().warning("%s inputs %d-%d: the partition task failed (%s); "
                                         "writing it in the flow", p.source, p.start, p.end,
                                         result)
                planner.work["failed"] += 1
                planner.work["written_by_flow"] += 1
                result = write_partition(cfg, out, p)
            planner.add(p.start, p.end, result)
        stats = []
        for planner in planners:
            st = planner.finish()
            st.work = dict(planner.work)
            stats.append(st)
        if decider is not None and dedupe is not None:
            dedupe.update(decider.report())
    finally:
        for planner in planners:
            planner.abort()
        if decider is not None:
            decider.close()
    tts = {k: sum(pl.tts[k] for pl in planners) for k in ("synthesis_calls", "cache_hits")}
    return stats, tts, ranges


def _stage_tasks(cfg: CorpusConfig, cfg_json: dict[str, Any], out: str,
                 recipes: list[StageRecipe]) -> dict[str, dict[str, Any]]:
    """Plan each stage here and submit a task per stage part, a window at a time, stages one
    after another; account for each part as it ends. Returns each stage's summary."""
    import contextlib

    from prefect_ray.context import remote_options

    planners = [StagePlanner(cfg, out, r) for r in recipes]

    def planned() -> Iterator[tuple[StagePlanner, StagePartition]]:
        for planner in planners:
            for p in planner.partitions():
                yield planner, p

    log = get_run_logger()
    queue, in_flight = planned(), {}
    while True:
        while len(in_flight) < _task_slots() and (nxt := next(queue, None)) is not None:
            planner, p = nxt
            gpu = gpu_options(cfg, planner.recipe, _cluster_gpus())
            with remote_options(**gpu) if gpu else contextlib.nullcontext():
                f = stage_part_task.submit(cfg_json, out, planner.recipe.model_dump(mode="json"),
                                           planner.recipe.stage, p.name,
                                           pickle.dumps(p, protocol=5))
            in_flight[f] = (planner, p)
        if not in_flight:
            break
        f = next(as_completed(list(in_flight)))
        planner, p = in_flight.pop(f)
        result = _outcome(f)
        if not isinstance(result, dict):
            log.warning("stage %s part %s: the task failed (%s); writing it in the flow",
                        planner.recipe.stage, p.name, result)
            planner.work["failed"] += 1
            planner.work["written_by_flow"] += 1
            result = write_stage_partition(cfg, out, planner.recipe, p)
        planner.add(p, result)
        sp = speech_progress(planner)
        log.info("%s: %d of %d samples planned so far written; questions: %d synthesized, %d "
                 "from the cache, %d kept as text", planner.stage, planner.written,
                 planner.planned, sp["synthesized"], sp["cached"], sp["kept_as_text"])
    return {pl.recipe.stage: pl.finish() for pl in planners}


def _cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0


def _run_name() -> str:
    from prefect.runtime import flow_run

    p = flow_run.parameters
    return f"build {Path(p['config']).stem} -> {p['out']} ({time.strftime('%Y-%m-%d %H:%M')})"


@flow(name="vita-corpus-build", flow_run_name=_run_name, log_prints=True)
@holds_out_lock("vita-corpus flow run")  # one writer per OUT (storage.lock)
def build_flow(config: str, out: str, stages: str = "all", recipes: str | None = None,
               run_validation: bool = True, partition_size: int = DEFAULT_SIZE
               ) -> dict[str, Any]:
    """Plan every source here and transform and write its partitions (a task each), build the
    stages, validate them, report."""
    started = time.time()
    recipe_list = [] if stages == "none" else select_stages(load_recipes(recipes), stages)
    cfg = prepare(load_config(config), out, stages=recipe_list)
    cfg_json = cfg.model_dump(mode="json")
    decisions: dict[str, Any] = {}
    stats, tts, ranges = _ingest_tasks(cfg, cfg_json, out, partition_size, decisions)
    summaries = _stage_tasks(cfg, cfg_json, out, recipe_list)
    report = finish(cfg, out, DEFAULT_STAGE, started, stats, tts, summaries,
                    extra={"partitions": partitions_report(stats, ranges, range_size(cfg)),
                           "dedupe": dedupe_entry(cfg, out, DEFAULT_STAGE, decisions or None,
                                                  [s.work for s in stats])})
    if run_validation and recipe_list:
        checks = {f"stage_{sid}": validate_task.submit(out, f"stage_{sid}") for sid in summaries}
        verdicts = {k: f.result() for k, f in checks.items()}
        report["validation"] = {k: {"passed": v["passed"], "quarantined": len(v["quarantined"]),
                                    "removed_samples": (v.get("removed_samples") or {}).get("count", 0)}
                                for k, v in verdicts.items()}
        # The verdicts into the report and its history, and the Data Docs made to open
        # offline: here, so that a served nightly deployment does it too.
        from flows.report.mix import refresh_after_validation

        refresh_after_validation(out, verdicts)
    print(f"built {report['totals']['written']} samples from {report['totals']['inputs']} "
          f"inputs into {out}; stages {list(summaries)}")
    return report


def ray_task_runner(address: str | None = None, num_cpus: int | None = None) -> Any:
    """prefect-ray's runner: the given cluster, RAY_ADDRESS, or a local Ray (no dashboard)."""
    from prefect_ray import RayTaskRunner

    address = address or os.environ.get("RAY_ADDRESS") or None
    init: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if not address and num_cpus:
        init["num_cpus"] = num_cpus
    if not address and os.environ.get("RAY_TMPDIR"):
        init["_temp_dir"] = os.environ["RAY_TMPDIR"]
    return RayTaskRunner(address=address, init_kwargs=init)


def _local_cluster() -> bool:
    """Whether every Ray node runs on this machine, so that its workers reach 127.0.0.1."""
    import ray

    here = {"127.0.0.1", "localhost", ray.util.get_node_ip_address()}
    return all(n["NodeManagerAddress"] in here for n in ray.nodes() if n.get("Alive"))


def _warm(*_: Any) -> None:
    """Import the work's modules (torch, OpenCV, decord, the transforms) in a Ray worker."""
    import flows.build.work  # noqa: F401
    import transforms.record  # noqa: F401


def warm_workers(n: int) -> list[Any]:
    """Start `n` tasks that import the work's modules on Ray's workers (seconds each), so that
    this happens while Prefect's server starts instead of inside the first partition tasks. Ray
    reuses an idle worker for the next task of the same job and resources, so the partition
    tasks find the modules loaded. Returns the tasks' refs (nothing needs to wait for them)."""
    import ray

    remote = ray.remote(num_cpus=1)(_warm)
    return [remote.options(name="warm-up: import the transforms").remote(i) for i in range(n)]


def run_build_flow(config: str, out: str, ray_address: str | None = None,
                   num_cpus: int | None = None, server: PendingServer | None = None,
                   **params: Any) -> dict[str, Any]:
    """Run the flow now, its tasks on Ray (Prefect's ephemeral API unless PREFECT_API_URL).

    Without PREFECT_API_URL, Prefect's temporary API server starts (`server`, when the caller
    began that earlier, see flows.prefect_server) while Ray does and the first workers import
    the transforms; its URL goes to the tasks with the flow's settings when every Ray node is
    on this machine. Otherwise a task on a Ray worker starts a temporary server of its own, one
    per worker (seconds each, and a process holding the SQLite database), as tasks on other
    machines still do: they cannot reach 127.0.0.1 here, so give a cluster a real server.
    """
    import ray
    from prefect.settings import PREFECT_API_URL, temporary_settings

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    server = server or start_in_background()
    runner = ray_task_runner(ray_address, num_cpus)
    owns_ray = not ray.is_initialized()
    try:
        if owns_ray:  # as RayTaskRunner would, which then uses this Ray and leaves it be
            address = runner.address if runner.address != "auto" else None
            ray.init(address, **runner.init_kwargs)
        # A warm worker per CPU, for the partition tasks; a failure here only means that the
        # first tasks import the modules themselves.
        warm_workers(int(ray.cluster_resources().get("CPU", 1)))
        url = server.api_url()
        if url and not _local_cluster():  # tasks elsewhere cannot reach it: Prefect's own way
            server.stop()
            url = None
        updates = {PREFECT_API_URL: url} if url else {}
        with temporary_settings(updates=updates):
            return build_flow.with_options(task_runner=runner)(config=str(config), out=out,
                                                               **params)
    finally:
        if owns_ray:
            from flows.build.ray_exec import shutdown_ray

            shutdown_ray()


def serve_nightly(config: str, out: str, cron: str, name: str = "nightly",
                  ray_address: str | None = None, **params: Any) -> None:
    """Create (or update) a deployment with a cron schedule on the Prefect server in
    PREFECT_API_URL and serve it: this process runs the scheduled flow runs until stopped."""
    runner = ray_task_runner(ray_address)
    build_flow.with_options(task_runner=runner).serve(
        name=name, cron=cron,
        parameters={"config": str(Path(config).resolve()), "out": out, **params})
