"""One writer per OUT: an advisory lock that a build, a flow run and `validate` hold on OUT.

Two builds into one OUT used to race: the second removed the first one's temporary parts as
leftovers of a killed run, and the first failed with FileNotFoundError. Now whoever writes OUT
holds OUT/.vita-corpus.lock first:

- locally, a POSIX record lock (fcntl) on that file: the kernel releases it when its holder
  exits, however it exits, so a killed build never leaves OUT locked; it is not inherited by
  forked children, and the file itself says who holds it (host, pid, start time, command) so
  that the one refused can name the holder;
- a holder that is gone but whose note is still there (it was killed) is taken over, with a
  log line naming it;
- on a remote store (s3://...) there is no lock to take: the note alone is the lock, written
  when absent; a note of a process on this host that is no longer running is taken over, one
  of another host must be removed by hand once that build is known to be gone.

Nested holds in one process (the CLI's build, then the stages and validation it runs) count
up and down; other processes wait (`wait_s`) or are refused at once with `OutLocked`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import inspect
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar

from storage import uri

LOCK_NAME = ".vita-corpus.lock"
F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger(__name__)

# OUT (as given) -> [open fd or None for a remote note, depth]: this process's holds
_HELD: dict[str, list[Any]] = {}


class OutLocked(RuntimeError):
    """Another process holds OUT; the message names it."""

    def __init__(self, out: str, holder: dict[str, Any] | None) -> None:
        self.holder = holder or {}
        who = describe(self.holder) if holder else "another process (no note in the lock file)"
        super().__init__(f"{out} is being written by {who}. Wait for it to finish (or pass "
                         f"--wait-lock SECONDS), or build into another --out.")


def describe(holder: dict[str, Any]) -> str:
    return (f"{holder.get('command', '?')} (host {holder.get('host', '?')}, pid "
            f"{holder.get('pid', '?')}, started {holder.get('started', '?')})")


def _key(out: str) -> str:
    """One name per folder: POSIX locks are per process, so two names of one OUT must not
    make two holds (releasing either would drop both)."""
    if "://" in out and not out.startswith("file://"):
        return out.rstrip("/")
    return os.path.realpath(out.removeprefix("file://"))


def _note(command: str) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": command or " ".join(os.path.basename(a) for a in sys.argv[:2])}


def _parse(data: bytes) -> dict[str, Any] | None:
    try:
        v = json.loads(data.decode("utf-8")) if data.strip() else None
    except (ValueError, UnicodeDecodeError):
        return None
    return v if isinstance(v, dict) else None


def _alive_here(holder: dict[str, Any]) -> bool | None:
    """Whether the holder runs: None when it is on another host (cannot tell)."""
    if holder.get("host") != socket.gethostname():
        return None
    try:
        os.kill(int(holder.get("pid", 0)), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return int(holder.get("pid", 0)) > 0


def _try_local(path: str, command: str) -> tuple[int | None, dict[str, Any] | None]:
    """(fd, None) when the lock was taken, (None, holder) when another process has it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EAGAIN):
            os.close(fd)
            raise
        holder = _parse(os.pread(fd, 4096, 0))
        # Closing any fd of a file drops this process's POSIX locks on it: we hold none here.
        os.close(fd)
        return None, holder
    old = _parse(os.pread(fd, 4096, 0))
    if old is not None:
        log.warning("taking over the lock on %s from %s, which is no longer running",
                    os.path.dirname(path), describe(old))
    data = json.dumps(_note(command)).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    return fd, None


def _try_remote(path: str, command: str) -> tuple[bool, dict[str, Any] | None]:
    if uri.exists(path, fresh=True):
        holder = _parse(uri.read_bytes(path))
        if holder is not None and _alive_here(holder) is not False:
            return False, holder
        log.warning("taking over the lock on %s from %s, which is no longer running",
                    path, describe(holder or {}))
    uri.write_bytes_atomic(path, json.dumps(_note(command)).encode())
    return True, None


def acquire(out: str, command: str = "", wait_s: float = 0.0, poll_s: float = 0.5) -> None:
    """Hold OUT's lock (again, when this process holds it already); raise OutLocked when
    another process holds it for longer than `wait_s` seconds."""
    out = _key(out)
    if out in _HELD:
        _HELD[out][1] += 1
        return
    uri.makedirs(out)
    path = uri.join(out, LOCK_NAME)
    local = "://" not in out or out.startswith("file://")
    deadline = time.monotonic() + wait_s
    said = False
    while True:
        if local:
            fd, holder = _try_local(path.removeprefix("file://"), command)
            if fd is not None:
                _HELD[out] = [fd, 1]
                return
        else:
            ok, holder = _try_remote(path, command)
            if ok:
                _HELD[out] = [None, 1]
                return
        if time.monotonic() >= deadline:
            raise OutLocked(out, holder)
        if not said:
            log.warning("waiting up to %.0f s for %s to finish with %s", wait_s,
                        describe(holder or {}), out)
            said = True
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


def release(out: str) -> None:
    out = _key(out)
    held = _HELD.get(out)
    if held is None:
        return
    held[1] -= 1
    if held[1] > 0:
        return
    del _HELD[out]
    fd = held[0]
    path = uri.join(out, LOCK_NAME)
    if fd is None:
        with contextlib.suppress(Exception):
            uri.remove(path)
        return
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)  # no note: the next holder has nobody to take over from
    os.close(fd)  # releases the lock


def holds_out_lock(command: str) -> Callable[[F], F]:
    """Decorate a function with an `out` parameter to hold OUT's lock while it runs (the
    Prefect flow: a flow run started by a deployment holds it too)."""

    def deco(fn: F) -> F:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with out_lock(str(sig.bind(*args, **kwargs).arguments["out"]), command):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return deco


@contextlib.contextmanager
def out_lock(out: str, command: str = "", wait_s: float = 0.0) -> Iterator[None]:
    """Hold OUT's lock for the block (see `acquire`)."""
    acquire(out, command, wait_s)
    try:
        yield
    finally:
        release(out)


def holder(out: str) -> dict[str, Any] | None:
    """Who holds OUT's lock now (None when nobody), without taking it."""
    out = _key(out)
    path = uri.join(out, LOCK_NAME)
    if out in _HELD:
        return _note("this process")
    if "://" in out and not out.startswith("file://"):
        return _parse(uri.read_bytes(path)) if uri.exists(path, fresh=True) else None
    p = path.removeprefix("file://")
    if not os.path.exists(p):
        return None
    fd, who = _try_local(p, "probe")
    if fd is not None:  # nobody held it; let go again
        os.ftruncate(fd, 0)
        os.close(fd)
        return None
    return who
