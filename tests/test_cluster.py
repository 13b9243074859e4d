"""The Prefect flow on a two-node Ray cluster (`ray start` head + worker on this machine)."""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from flows.build.pipeline import build
from schemas.config import load_config
from schemas.recipes import DEFAULT_RECIPES

from conftest import CLI, REPO, add_source, env_for, free_port, make_caption_corpus, tars

RAY = str(Path(sys.executable).parent / "ray")


@dataclass
class Cluster:
    address: str  # the head's GCS, host:port
    env: dict[str, str]  # what a driver of this cluster needs (the shared auth token)
    temp_dir: str
    starters: list[subprocess.Popen] = field(default_factory=list)

    def run(self, code: str, timeout: float = 120) -> dict:
        """Run `code` in a fresh driver of this cluster (ADDRESS holds the cluster's address);
        it leaves its answer in `result`."""
        script = ("import json, ray\n"
                  f"ADDRESS = {self.address!r}\n"
                  "ray.init(address=ADDRESS, logging_level='ERROR')\n"
                  f"{code}\n"
                  "print('RESULT ' + json.dumps(result))\n")
        proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, **self.env},
                              capture_output=True, text=True, timeout=timeout)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-3000:]
        return json.loads(lines[-1][len("RESULT "):])


def task_nodes(logs: Path, task_name: str) -> set[str]:
    """The Ray nodes whose workers ran `task_name`, from a session's logs: a worker's
    worker-<id>-<job>-<pid>.err marks each task it ran, its python-core-worker-<id>_<pid>.log
    names its node."""
    nodes = set()
    for err in logs.glob("worker-*.err"):
        if f":task_name:{task_name}\n" not in err.read_text():
            continue
        worker_id, _, pid = err.stem.split("-")[1:4]
        core = (logs / f"python-core-worker-{worker_id}_{pid}.log").read_text()
        nodes.add(re.search(r"node_id=([0-9a-f]+)", core).group(1))
    return nodes


def _port_block(n: int) -> int:
    """The first of `n` consecutive free ports (Ray's worker port range)."""
    for base in range(20000 + os.getpid() % 97 * 200, 60000, 997):
        try:
            socks = []
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no block of {n} free ports")


def _node_ports(worker_ports: int) -> list[str]:
    """Every port a node listens on, chosen here, so that two nodes (and any other Ray on the
    machine, such as the test session's local one) never reach for the same default."""
    base = _port_block(worker_ports)
    return ["--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
            "--min-worker-port", str(base), "--max-worker-port", str(base + worker_ports - 1),
            "--dashboard-agent-listen-port", str(free_port()),
            "--dashboard-agent-grpc-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()),
            "--metrics-export-port", str(free_port())]


def _stop(starters: list[subprocess.Popen]) -> None:
    """Stop what the `ray start` commands started, by pid: their process trees (Ray workers
    start their own sessions, so a process group would miss them). `ray stop` is not used: it
    would also stop every other Ray on this machine, the test session's own included."""
    procs = []
    for p in starters:
        try:
            procs += [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, left = psutil.wait_procs(procs, timeout=5)
    for proc in left:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=10)
    for p in starters:
        p.wait(timeout=10)


@pytest.fixture
def two_node_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A head and a worker node, 1 CPU each, on 127.0.0.1, their state in a short temp dir.
    Ray 2.60's `ray start --head` turns token auth on when a token is at hand (~/.ray/auth_token,
    which a local ray.init writes), and the nodes and every driver must then agree: here they
    all get one generated token through the environment."""
    temp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # Ray's socket paths must stay short
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env = {**os.environ, **auth, "DASHBOARD_METRIC_PORT": str(free_port())}
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    cluster = Cluster(f"127.0.0.1:{port}", auth, temp)
    common = ["--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
              "--disable-usage-stats"]
    head = [RAY, "start", "--head", "--port", str(port), "--temp-dir", temp,
            "--include-dashboard=false", "--dashboard-port", str(free_port()),
            "--ray-client-server-port", str(free_port()), *common, *_node_ports(100)]
    worker = [RAY, "start", "--address", cluster.address, *common, *_node_ports(100)]
    try:
        for i, cmd in enumerate((head, worker)):
            log = open(tmp_path / f"ray-start-{i}.log", "wb")  # noqa: SIM115 - the process keeps it
            cluster.starters.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=log,
                                                     start_new_session=True))
            if i == 0:
                _wait_for_port(port, 60, cluster.starters[0], tmp_path / "ray-start-0.log")
        alive = cluster.run("import time\n"
                            "for _ in range(120):\n"
                            "    result = [n['NodeID'] for n in ray.nodes() if n['Alive']]\n"
                            "    if len(result) == 2: break\n"
                            "    time.sleep(0.5)\n")
        assert len(alive) == 2, (tmp_path / "ray-start-1.log").read_text()[-3000:]
        yield cluster
    finally:
        _stop(cluster.starters)


def _wait_for_port(port: int, seconds: float, proc: subprocess.Popen, log: Path) -> None:
    end = time.time() + seconds
    while time.time() < end:
        assert proc.poll() is None, log.read_text()[-3000:]
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"the Ray head did not listen on {port} in {seconds} s")


@pytest.mark.slow
def test_flow_on_a_two_node_cluster_equals_the_plain_build(tmp_path, two_node_cluster):
    cfg_path = make_caption_corpus(tmp_path / "in", 40, max_samples=5, bad_every=9,
                                   image_size=(320, 240))
    add_source(cfg_path, "cap2", "cap")
    flow_out = tmp_path / "flow"
    proc = subprocess.run([CLI, "run", "-c", str(cfg_path), "-o", str(flow_out), "--stages", "1.1",
                           "--ray-address", two_node_cluster.address, "--partition-size", "10"],
                          env=env_for(tmp_path, **two_node_cluster.env), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, log
    assert "Finished in state Completed" in proc.stdout + proc.stderr, log
    assert "built 72 samples from 80 inputs" in proc.stdout + proc.stderr, log

    stages = [r for r in DEFAULT_RECIPES if r.stage == "1.1"]
    build(load_config(cfg_path), str(tmp_path / "plain"), stages=stages)
    assert tars(flow_out) == tars(tmp_path / "plain")
    assert len(tars(flow_out)) == 16
    assert tars(flow_out, "stage_1.1") == tars(tmp_path / "plain", "stage_1.1")
    report = json.loads((flow_out / "report" / "build_report.json").read_text())
    assert report["accounted"] and report["sources"]["cap2"]["rejected"] == 4

    # Both nodes are alive and each transformed partitions (8 of them, one CPU per node).
    alive = two_node_cluster.run("result = sorted(n['NodeID'] for n in ray.nodes() if n['Alive'])")
    assert len(alive) == 2
    logs = Path(two_node_cluster.temp_dir) / "session_latest" / "logs"
    assert sorted(task_nodes(logs, "transform_task")) == alive
    # The tasks reported to the flow's own Prefect API, not to servers started in the workers.
    assert not [p.name for p in logs.glob("worker-*.err") if "Starting temporary server" in p.read_text()]
