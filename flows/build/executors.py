"""Executors: map work over a stream, in this process or on Ray.

Two shapes of work. `map_ordered` takes a factory of a per-item function (called once per
process or actor, so that what the work loads, a TTS model, is loaded once) and an iterator of
(tag, payload) pairs, and yields (tag, result) in the same order; a payload of None is a marker
that passes through untouched (result None). Validation reads shards this way. `map_tasks`
runs a function on whole tasks (a build's partitions: transform and write their parts) and
yields (tag, result) as they finish, keeping a bounded number under way, so the caller's memory
does not grow with the stream. `LocalExecutor` runs in-process;
flows.build.ray_exec.RayDataExecutor runs on a local Ray or a cluster. This module knows
nothing of Ray: the Ray layer imports it, never the other way round (the CLI picks one by
name).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, TypeVar

T = TypeVar("T")
P = TypeVar("P")
R = TypeVar("R")
Fn = Callable[[dict[str, Any]], dict[str, Any]]
FnFactory = Callable[[], Fn]


def failed_result(reason: str, detail: str) -> dict[str, Any]:
    """The work's result for an input it rejects (see flows.build.work.Worker)."""
    return {"ok": False, "reason": reason, "detail": detail, "suffixes": [], "payloads": [],
            "tts_calls": 0, "tts_hits": 0}


class Executor(Protocol):
    def map_ordered(self, make_fn: FnFactory, items: Iterable[tuple[T, dict[str, Any] | None]]
                    ) -> Iterator[tuple[T, dict[str, Any] | None]]: ...

    def map_tasks(self, fn: Callable[[P], R], items: Iterable[tuple[T, P]], **options: Any
                  ) -> Iterator[tuple[T, R]]: ...

    def close(self) -> None: ...


class LocalExecutor:
    """Runs the work in this process, one input at a time: the baseline, and for tiny builds."""

    name = "local"

    def map_ordered(self, make_fn: FnFactory, items: Iterable[tuple[T, dict[str, Any] | None]]
                    ) -> Iterator[tuple[T, dict[str, Any] | None]]:
        fn = make_fn()
        for tag, payload in items:
            yield tag, (None if payload is None else fn(payload))

    def map_tasks(self, fn: Callable[[P], R], items: Iterable[tuple[T, P]], **options: Any
                  ) -> Iterator[tuple[T, R]]:
        """(tag, fn(task)) in order; `options` (a Ray task's resources) do not apply here."""
        for tag, task in items:
            yield tag, fn(task)

    def close(self) -> None:
        pass
