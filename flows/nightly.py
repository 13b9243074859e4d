"""The Prefect flow of a corpus build: transforms per partition, shards per source, stages,
validation, report.

Each partition of a source's new inputs (its transforms, staged: flows.partitions), each
source's shards, each stage and each stage's validation is a Prefect task with retries and
backoff; the tasks run on Ray through prefect-ray's RayTaskRunner (a local Ray started for the
run, or `ray_address` / RAY_ADDRESS for a cluster). A task that is retried, or a whole flow run
after a crash, resumes from the staged partitions and the committed parts on disk (see
flows.build), so reruns end with exactly the samples of an uninterrupted run.

Partition tasks are submitted in input order (sources in config order), one more than Ray has
CPUs at a time: Ray runs queued tasks of prefect-ray in no fixed order, and a source's shard
task, which follows its partitions' staging files as they are written, would otherwise wait
for an early partition while later ones pile up in staging.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect_ray.context import remote_options

from flows.build import DEFAULT_STAGE, SourceStats, finish, ingest, prepare
from flows.partitions import (
    DEFAULT_SIZE,
    Partition,
    StagedExecutor,
    clear_markers,
    mark_planned,
    mark_ready,
    plan,
    remove_staging,
    staging_key,
    transform_partition,
)
from flows.prefect_server import PendingServer, start_in_background
from flows.stages import build_stage
from schemas.config import CorpusConfig, load_config
from schemas.recipes import load_recipes, select_stages

RETRY_DELAYS = [10, 60, 300]  # seconds: backoff between a task's attempts


def _stats_from_json(name: str, d: dict[str, Any]) -> SourceStats:
    from collections import Counter

    st = SourceStats(name, d["kind"], d["inputs"], d["written"], d["rejected"],
                     Counter(d["reject_reasons"]), d["parts"], d["parts_reused"],
                     d["shard_bytes"], Counter(d["members"]), Counter(d["languages"]),
                     Counter(d.get("speech_questions", {})))
    return st


@task(retries=len(RETRY_DELAYS), retry_delay_seconds=RETRY_DELAYS, cache_policy=NO_CACHE,
      task_run_name="transform {source} inputs {start}-{end}")
def transform_task(cfg_json: dict[str, Any], out: str, source: str, k: int, start: int,
                   end: int, payloads: list[dict[str, Any]], size: int) -> dict[str, int]:
    t0 = time.monotonic()
    cfg = CorpusConfig.model_validate(cfg_json)
    counts = transform_partition(cfg, out, Partition(source, k, start, end, payloads), size)
    get_run_logger().info("%s inputs %d-%d: %d records, %d transformed, %d already staged, "
                          "in %.1f s", source, start, end, counts["records"],
                          counts["transformed"], counts["reused"], time.monotonic() - t0)
    return counts


@task(retries=len(RETRY_DELAYS), retry_delay_seconds=RETRY_DELAYS, cache_policy=NO_CACHE,
      task_run_name="shard {source}")
def shard_source(cfg_json: dict[str, Any], out: str, source: str, size: int) -> dict[str, Any]:
    """Write `source`'s parts in input order from its partitions' staged results, following
    the partition tasks as they finish."""
    cfg = CorpusConfig.model_validate(cfg_json)
    staged = StagedExecutor(cfg, out, size, follow=True)
    stats, tts = ingest(cfg, out, sources=[source], executor=staged, on_commit=staged.committed)
    remove_staging(out, DEFAULT_STAGE, source)
    log = get_run_logger()
    log.info("%s: %d inputs, %d written, %d rejected; %.1f s waiting for partitions", source,
             stats[0].inputs, stats[0].written, stats[0].rejected, staged.waited_s)
    if staged.transformed:
        log.warning("%s: %d records were not staged by the partition tasks and were "
                    "transformed by this task", source, staged.transformed)
    return {"stats": stats[0].to_json(), "tts": tts, "transformed_here": staged.transformed}


@task(retries=len(RETRY_DELAYS), retry_delay_seconds=RETRY_DELAYS,
      task_run_name="stage {stage_id}")
def build_stage_task(cfg_json: dict[str, Any], out: str, stage_id: str,
                     recipes_dir: str | None) -> dict[str, Any]:
    cfg = CorpusConfig.model_validate(cfg_json)
    return build_stage(cfg, out, load_recipes(recipes_dir)[stage_id])


@task(retries=1, retry_delay_seconds=30, task_run_name="validate {stage}")
def validate_task(out: str, stage: str) -> dict[str, Any]:
    from flows.validate import validate_stage

    return validate_stage(out, stage)


def _outcome(future: Any) -> Any:
    """A task's result, or its error: what it raised, or why its Ray worker is gone (a worker
    that died more often than Ray retries a task raises here rather than in the task)."""
    try:
        return future.result(raise_on_failure=False)
    except Exception as err:
        return err


def _partition_summary(results: list[Any]) -> dict[str, int]:
    """What a source's partition tasks did (their results, or their errors): records
    transformed, found already staged, tasks failed."""
    out = {"tasks": len(results), "failed": 0, "records": 0, "transformed": 0, "reused": 0}
    for r in results:
        if not isinstance(r, dict):
            out["failed"] += 1
            continue
        for k in ("records", "transformed", "reused"):
            out[k] += r[k]
    return out


def _task_slots() -> int:
    """Partition tasks to keep submitted at once: one more than Ray's CPUs, so that a worker
    that finishes finds the next partition queued, and no more, because Ray starts queued
    tasks of prefect-ray in no fixed order (each submission is a function of its own to Ray),
    and a shard task waiting for a partition that Ray put off holds up its source."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else os.cpu_count()
    return (cpus or 1) + 1


def _ingest_tasks(cfg: CorpusConfig, cfg_json: dict[str, Any], out: str, size: int
                  ) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """Submit every source's partition tasks in input order, a window at a time, and each
    source's shard task when its first partition is done (right away for a source with none).
    The shard task follows the partitions' staging files; the markers written here tell it
    that a partition's task has ended, or that a source has no more partitions to come
    (flows.partitions). Returns the shard and partition futures per source."""
    shards: dict[str, Any] = {}
    parts: dict[str, list[Any]] = {s.name: [] for s in cfg.sources}

    def shard(name: str) -> None:
        # Shard tasks take no Ray CPU: they mostly copy staged bytes into tars, and so write
        # while the workers transform.
        if name not in shards:
            with remote_options(num_cpus=0):
                shards[name] = shard_source.submit(cfg_json, out, name, size)

    def planned() -> Iterator[Partition]:
        for src in cfg.sources:
            clear_markers(out, DEFAULT_STAGE, src.name, staging_key(cfg, src, size))
            ks = []
            for p in plan(cfg, out, src, size):
                ks.append(p.k)
                yield p
            mark_planned(out, DEFAULT_STAGE, src.name, ks)
            print(f"{src.name}: {len(ks)} partition task{'' if len(ks) == 1 else 's'} of up to "
                  f"{size} inputs")
            if not ks:
                shard(src.name)

    queue, in_flight, ended = planned(), {}, 0
    while True:
        # Until a partition has ended the workers are still starting (or warming up): a task
        # queued beyond their number could start before an earlier one.
        slots = _task_slots() - (0 if ended else 1)
        while len(in_flight) < slots and (p := next(queue, None)) is not None:
            f = transform_task.submit(cfg_json, out, p.source, p.k, p.start, p.end, p.payloads,
                                      size)
            in_flight[f] = (p.source, p.k)
            parts[p.source].append(f)
        if not in_flight:
            return shards, parts
        f = next(as_completed(list(in_flight)))
        source, k = in_flight.pop(f)
        ended += 1
        # A failed partition only means that the shard task transforms those records itself
        # (and meets the same error if it is one).
        staged = isinstance(_outcome(f), dict)
        mark_ready(out, DEFAULT_STAGE, source, k, ok=staged)
        shard(source)


def _run_name() -> str:
    from prefect.runtime import flow_run

    p = flow_run.parameters
    return f"build {Path(p['config']).stem} -> {p['out']} ({time.strftime('%Y-%m-%d %H:%M')})"


@flow(name="vita-corpus-build", flow_run_name=_run_name, log_prints=True)
def build_flow(config: str, out: str, stages: str = "all", recipes: str | None = None,
               run_validation: bool = True, partition_size: int = DEFAULT_SIZE
               ) -> dict[str, Any]:
    """Transform every source's partitions (a task each), shard each source in input order
    (a task each), build the stages, validate them, report."""
    started = time.time()
    recipe_list = [] if stages == "none" else select_stages(load_recipes(recipes), stages)
    cfg = prepare(load_config(config), out, stages=recipe_list)
    cfg_json = cfg.model_dump(mode="json")
    shard_futures, part_futures = _ingest_tasks(cfg, cfg_json, out, partition_size)
    partitions = {name: _partition_summary([_outcome(f) for f in fs])
                  for name, fs in part_futures.items()}
    futures = [shard_futures[s.name] for s in cfg.sources]
    results = [f.result() for f in futures]
    for s, r in zip(cfg.sources, results, strict=True):
        partitions[s.name]["transformed_by_shard_task"] = r["transformed_here"]
    stats = [_stats_from_json(s.name, r["stats"]) for s, r in zip(cfg.sources, results, strict=True)]
    tts = {k: sum(r["tts"][k] for r in results) for k in ("synthesis_calls", "cache_hits")}
    stage_futures = {r.stage: build_stage_task.submit(cfg_json, out, r.stage, recipes)
                     for r in recipe_list}
    summaries = {sid: f.result() for sid, f in stage_futures.items()}
    report = finish(cfg, out, DEFAULT_STAGE, started, stats, tts, summaries,
                    extra={"partitions": {"size": partition_size, "sources": partitions}})
    if run_validation and recipe_list:
        checks = {f"stage_{sid}": validate_task.submit(out, f"stage_{sid}") for sid in summaries}
        report["validation"] = {k: {"passed": f.result()["passed"],
                                    "quarantined": len(f.result()["quarantined"])}
                                for k, f in checks.items()}
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
    import flows.work  # noqa: F401
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
            from flows.ray_exec import shutdown_ray

            shutdown_ray()


def serve_nightly(config: str, out: str, cron: str, name: str = "nightly",
                  ray_address: str | None = None, **params: Any) -> None:
    """Create (or update) a deployment with a cron schedule on the Prefect server in
    PREFECT_API_URL and serve it: this process runs the scheduled flow runs until stopped."""
    runner = ray_task_runner(ray_address)
    build_flow.with_options(task_runner=runner).serve(
        name=name, cron=cron,
        parameters={"config": str(Path(config).resolve()), "out": out, **params})
