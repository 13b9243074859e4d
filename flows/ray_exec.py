"""The thin Ray layer: Ray Data maps the per-input work over windows of the input stream.

The input is a stream (sources are read incrementally in the driver), so it is cut into
windows of `window` inputs; each window is a Ray Data dataset mapped with `map_batches` by a
pool of actors (one per CPU; each builds the work function once, so a TTS model loads once per
actor) and read back in order (`preserve_order`). Ray Data's streaming executor bounds memory: results are
pulled as the driver writes them. A window costs about a second of Ray Data start-up, so
windows are large; all sources share one stream, so a build of many small sources is a few
windows, not one per source.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import pickle
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import numpy as np
import ray

from flows.executors import FnFactory

T = TypeVar("T")
log = logging.getLogger(__name__)


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

    def close(self) -> None:
        pass
