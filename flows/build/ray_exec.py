"""The thin Ray layer: Ray tasks for a build's partitions, Ray Data for per-item work.

`map_tasks` runs one Ray task per partition (it transforms the partition's records and writes
its parts to OUT; flows.build.partitions), keeping twice as many submitted as Ray has CPUs, and hands
back each small result as it finishes: the driver only plans and accounts, so one driver keeps
many workers busy, and what it holds does not grow with the stream.

For `map_ordered` (validation's per-shard reads), the input is a stream, cut into windows
of `window` items; each window is a Ray Data dataset mapped with `map_batches` by a pool of
actors (one per CPU; each builds the work function once) and read back in order
(`preserve_order`). Ray Data's streaming executor bounds memory: results are pulled as the
caller consumes them. A window costs about a second of Ray Data start-up, so windows are large.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import pickle
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import numpy as np
import ray

from flows.build.executors import FnFactory

T = TypeVar("T")
P = TypeVar("P")
R = TypeVar("R")
log = logging.getLogger(__name__)
TASK_RETRIES = 3  # a task whose worker died (killed, out of memory) runs again on another


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to RAY_ADDRESS / `address`, or start a local Ray in-process (no dashboard)."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                              "logging_level": logging.WARNING, "configure_logging": True}
    if os.environ.get("RAY_TMPDIR") and not address:
        kwargs["_temp_dir"] = os.environ["RAY_TMPDIR"]
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, **kwargs)


def shutdown_ray() -> None:
    """ray.shutdown(), less the second it spends on a local Ray's autoscaler monitor.

    ray.shutdown stops the GCS before the monitor, whose SIGTERM handler then tries to report
    to the stopped GCS until it is killed a second later. A Ray started by this process has
    nothing to autoscale, so its monitor is killed first (a Ray connected to is left alone).
    """
    node = getattr(ray._private.worker, "_global_node", None)
    if node is not None:
        with contextlib.suppress(Exception):  # private API: at worst the second is spent
            node.kill_monitor(check_alive=False)
    ray.shutdown()


class _Actor:
    """A Ray Data actor: builds the work function once (loading what it loads once), then maps
    batches. Payloads travel as JSON and results as pickles, so Arrow sees two flat columns
    instead of inferring (and merging) nested schemas row by row."""

    def __init__(self, make_fn: FnFactory) -> None:
        self.fn = make_fn()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        results = [pickle.dumps(self.fn(json.loads(p)), protocol=5) for p in batch["payload"]]
        return {"w": np.asarray(batch["w"]), "result": results}


def _call(fn: Callable[[Any], Any], task: Any) -> Any:
    return fn(task)


class RayDataExecutor:
    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None,
                 window: int = 2048, batch_size: int = 4) -> None:
        init_ray(address, num_cpus)
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        # Ray Data logs every dataset's start and plan at INFO; our progress display says more.
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        self.window = window
        self.batch_size = batch_size
        self.cpus = int(ray.cluster_resources().get("CPU", 1))
        self.gpus = float(ray.cluster_resources().get("GPU", 0))

    def map_ordered(self, make_fn: FnFactory, items: Iterable[tuple[T, dict[str, Any] | None]]
                    ) -> Iterator[tuple[T, dict[str, Any] | None]]:
        import ray.data

        it = iter(items)
        while chunk := list(itertools.islice(it, self.window)):
            work = [{"w": i, "payload": json.dumps(p)} for i, (_, p) in enumerate(chunk)
                    if p is not None]
            pos = 0  # next position of `chunk` to hand back
            if work:
                blocks = max(1, min(len(work) // self.batch_size, self.cpus * 4))
                ds = ray.data.from_items(work, override_num_blocks=blocks)
                ds = ds.map_batches(_Actor, fn_constructor_args=(make_fn,),
                                    batch_size=self.batch_size, batch_format="numpy",
                                    compute=ray.data.ActorPoolStrategy(
                                        size=max(1, min(self.cpus, len(work)))))
                # preserve_order: rows come back in input order, so each one is handed back
                # as soon as it arrives and the driver writes while the rest is transformed.
                for row in ds.iter_rows():
                    w = row["w"]
                    if w < pos:
                        raise RuntimeError(f"Ray Data returned input {w} after {pos - 1}")
                    for tag, _ in chunk[pos:w]:  # markers between work items
                        yield tag, None
                    yield chunk[w][0], pickle.loads(row["result"])
                    pos = w + 1
            for tag, payload in chunk[pos:]:
                if payload is not None:
                    raise RuntimeError("Ray Data lost an input: a result is missing")
                yield tag, None

    def map_tasks(self, fn: Callable[[P], R], items: Iterable[tuple[T, P]],
                  name: str = "write partition", num_gpus: float = 0.0
                  ) -> Iterator[tuple[T, R]]:
        """(tag, fn(task)) for each (tag, task), as the tasks finish; at most 2 x CPUs submitted.
        A task that raises stops the stream (the rest are cancelled) with its error. `num_gpus`:
        the share of a GPU each task asks for (a stage that speaks with a neural backend)."""
        remote = ray.remote(num_cpus=1, num_gpus=num_gpus, max_retries=TASK_RETRIES)(_call)
        remote = remote.options(name=name)
        fn_ref = ray.put(fn)  # shipped once, not with every task
        it = iter(items)
        in_flight: dict[Any, T] = {}
        slots = 2 * self.cpus
        try:
            while True:
                while len(in_flight) < slots and (nxt := next(it, None)) is not None:
                    in_flight[remote.remote(fn_ref, nxt[1])] = nxt[0]
                if not in_flight:
                    return
                done, _ = ray.wait(list(in_flight), num_returns=1)
                for ref in done:
                    tag = in_flight.pop(ref)
                    yield tag, ray.get(ref)
        finally:
            for ref in in_flight:  # an error, or the caller stopped reading
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)

    def close(self) -> None:
        pass
