"""Prefect's temporary API server for a run without PREFECT_API_URL, started early.

Prefect's client starts a temporary server (uvicorn serving Prefect's API app on 127.0.0.1)
when no API URL is configured. Started that way it comes late: after the driver has imported
Prefect's server modules (FastAPI, SQLAlchemy: seconds) and only when the flow begins. Here
the same server command starts in a background thread as soon as the run begins, without
importing those modules in this process, while Ray starts and the flow's modules load; the run
then waits for its health check. One server serves every run of the process and stops when the
process exits (after Prefect's own exit handlers have sent the last logs).
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import Future

STARTUP_FAILED = 3  # uvicorn's exit status when it cannot bind its port, or the app's start fails


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


class TemporaryServer:
    """A uvicorn process serving Prefect's API app, as Prefect's own temporary server does."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.port = _free_port()
        self.process = self._spawn()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def _spawn(self) -> subprocess.Popen[bytes]:
        import prefect

        return subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent),
             "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
            env=self.env)

    def wait_ready(self, timeout: float) -> str:
        """Wait for the API's health check; return its URL."""
        end = time.monotonic() + timeout
        retries = 3
        while time.monotonic() < end:
            code = self.process.poll()
            if code == STARTUP_FAILED and retries and _port_taken(self.port):
                # another process took the port between our choosing it and uvicorn binding it
                retries -= 1
                self.port = _free_port()
                self.process = self._spawn()
                continue
            if code is not None:
                raise RuntimeError(f"Prefect's temporary API server exited with status {code} "
                                   "before it was ready (its errors are printed above). Set "
                                   "PREFECT_API_URL to use a running Prefect server instead.")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self.api_url
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(
            f"Prefect's temporary API server did not answer within {timeout:.0f} s "
            "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS). Raise that setting on a slow "
            "machine, or set PREFECT_API_URL to use a running Prefect server.")

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


_lock = threading.Lock()
_server: TemporaryServer | None = None


def _start() -> tuple[TemporaryServer | None, float]:
    """The process's temporary server, started unless an API URL is configured (a profile's
    too); with Prefect's start-up timeout."""
    global _server
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        get_current_settings,
    )

    timeout = float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    if PREFECT_API_URL.value():
        return None, timeout
    with _lock:
        if _server is None or not _server.running():
            env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                   "PREFECT__SERVER_FINAL": "1",
                   **get_current_settings().to_environment_variables(exclude_unset=True)}
            _server = TemporaryServer(env)
            atexit.register(_server.stop)
        return _server, timeout


class PendingServer:
    """A temporary server being started in a background thread."""

    def __init__(self) -> None:
        self._future: Future[tuple[TemporaryServer | None, float]] = Future()
        threading.Thread(target=self._run, name="prefect-server-start", daemon=True).start()

    def _run(self) -> None:
        try:
            self._future.set_result(_start())
        except BaseException as err:  # handed to the waiting run
            self._future.set_exception(err)

    def api_url(self) -> str | None:
        """Wait until the server answers; its API URL, or None when one is configured."""
        server, timeout = self._future.result()
        return server.wait_ready(timeout) if server is not None else None

    def stop(self) -> None:
        server, _ = self._future.result()
        if server is not None:
            server.stop()


def start_in_background() -> PendingServer:
    """Begin starting the temporary server (nothing when PREFECT_API_URL is configured)."""
    return PendingServer()
