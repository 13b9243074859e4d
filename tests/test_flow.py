"""The Prefect flow on a local Ray, and a cron deployment on a real Prefect server."""

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flows.build.pipeline import build
from schemas.config import load_config
from schemas.recipes import DEFAULT_RECIPES

from conftest import CLI, REPO, env_for, free_port, make_caption_corpus, tars


def test_flow_on_local_ray_equals_the_plain_build(tmp_path):
    cfg_path = make_caption_corpus(tmp_path / "in", 12, max_samples=5, bad_every=5)
    env = env_for(tmp_path)
    proc = subprocess.run([CLI, "run", "-c", str(cfg_path), "-o", str(tmp_path / "flow"),
                           "--stages", "1.1,1.2", "--num-cpus", "2", "--partition-size", "4"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert "Finished in state Completed" in text
    # Partitions are whole ranges of max_samples (5) inputs: 4 inputs round up to one range.
    assert "cap: 3 partition tasks of up to 5 inputs" in text
    assert "built 10 samples from 12 inputs" in proc.stdout + proc.stderr
    stages = [r for r in DEFAULT_RECIPES if r.stage in ("1.1", "1.2")]
    build(load_config(cfg_path), str(tmp_path / "plain"), stages=stages)
    flow_out = tmp_path / "flow"
    assert tars(flow_out) == tars(tmp_path / "plain")
    assert tars(flow_out, "stage_1.2") == tars(tmp_path / "plain", "stage_1.2")
    report = json.loads((flow_out / "report" / "build_report.json").read_text())
    assert report["accounted"] and report["sources"]["cap"]["rejected"] == 2
    assert json.loads((flow_out / "validation" / "stage_1.2.verdict.json").read_text())["passed"]
    # The tasks on the Ray workers reported to the flow's temporary API server instead of each
    # starting one of their own.
    logs = list(Path(env["RAY_TMPDIR"]).glob("session_*/logs/worker-*.err"))
    assert [p for p in logs if ":task_name:transform_task" in p.read_text()]
    # Three partitions, each transformed and written by a task of its own on a Ray worker;
    # none failed for good (the flow would have written it itself, and logged so).
    worker_log = "".join(p.read_text() for p in logs)
    for part in ("0-5", "5-10", "10-12"):
        assert f"Task run 'transform cap inputs {part}' - Finished in state Completed" in worker_log
    assert "writing it in the flow" not in text
    assert not [p.name for p in logs if "Starting temporary server" in p.read_text()]
    # A worker imported the transforms while the server started (which worker Ray then gives
    # the ingest task depends on timing, so only the warm-up itself is checked).
    assert [p for p in logs if ":task_name:warm-up" in p.read_text()]
    # The temporary server went with the command.
    assert not _servers_of(env["PREFECT_HOME"])


def test_the_flow_under_prefects_test_harness_reports_every_task_to_its_api(tmp_path,
                                                                            monkeypatch):
    """In this process: Prefect's test harness (its own temporary API and database), the flow
    with its tasks on a local Ray of 2 CPUs; the tasks that ran on the Ray workers are in the
    harness's API, named after what they did, and the shards are the plain build's. A stage is
    several tasks, one per stage part."""
    from prefect import get_client
    from prefect.testing.utilities import prefect_test_harness

    from flows.nightly import run_build_flow
    from schemas.recipes import load_recipes, write_recipes

    cfg_path = make_caption_corpus(tmp_path / "in", 9, max_samples=2, bad_every=4)
    write_recipes(tmp_path / "recipes")
    stage = tmp_path / "recipes" / "stage_1.2.yaml"
    stage.write_text(stage.read_text().replace("shard_max_samples: 1000", "shard_max_samples: 2"))
    for k, v in env_for(tmp_path).items():
        if k in ("PREFECT_HOME", "RAY_TMPDIR"):
            monkeypatch.setenv(k, v)
    with prefect_test_harness(server_startup_timeout=180):
        report = run_build_flow(str(cfg_path), str(tmp_path / "flow"), num_cpus=2,
                                stages="1.2", recipes=str(tmp_path / "recipes"),
                                run_validation=False, partition_size=4)
        with get_client(sync_client=True) as client:
            [flow_run] = client.read_flow_runs()
            task_runs = client.read_task_runs()
    assert flow_run.state.is_completed() and flow_run.name.startswith("build corpus -> ")
    ran = {r.name: r.state.type.value for r in task_runs if not r.name.startswith("warm")}
    # 9 inputs, 2 rejected: stage 1.2 takes all 7 samples, in parts of 2.
    assert ran == {"transform cap inputs 0-4": "COMPLETED", "transform cap inputs 4-8":
                   "COMPLETED", "transform cap inputs 8-9": "COMPLETED",
                   **{f"stage 1.2 part cap-{k:05d}": "COMPLETED" for k in range(4)}}
    assert all(r.flow_run_id == flow_run.id for r in task_runs)
    assert report["accounted"] and report["partitions"]["sources"]["cap"]["tasks"] == 3
    assert report["stages"]["1.2"]["partitions"]["written"] == 4
    assert report["stages"]["1.2"]["pools"]["caption"]["selected"] == 7
    build(load_config(cfg_path), str(tmp_path / "plain"),
          stages=[load_recipes(tmp_path / "recipes")["1.2"]])
    assert tars(tmp_path / "flow") == tars(tmp_path / "plain")
    assert tars(tmp_path / "flow", "stage_1.2") == tars(tmp_path / "plain", "stage_1.2")
    assert len(tars(tmp_path / "flow", "stage_1.2")) == 4


def _servers_of(prefect_home: str) -> list[int]:
    """Pids of Prefect API servers (uvicorn) running with this PREFECT_HOME."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if ("prefect.server.api.server:create_app" in (proc.info["cmdline"] or [])
                    and proc.environ().get("PREFECT_HOME") == prefect_home):
                found.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


SERVER_SCRIPT = """
import json, sys, urllib.request
from flows import prefect_server
pending = prefect_server.start_in_background()
try:
    url = pending.api_url()
except RuntimeError as err:
    print(json.dumps({"error": str(err)}))
    sys.exit(0)
if url is None:
    print(json.dumps({"url": None, "server": prefect_server._server is not None}))
    sys.exit(0)
with urllib.request.urlopen(url + "/health", timeout=10) as r:
    status = r.status
again = prefect_server.start_in_background().api_url()
pid = prefect_server._server.process.pid
print(json.dumps({"url": url, "status": status, "again": again, "pid": pid}), flush=True)
sys.stdin.readline()  # the test looks at the running server, then lets this process exit
"""


def _server_script(tmp_path: Path, **extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SERVER_SCRIPT], env=env_for(tmp_path, **extra),
                            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def test_temporary_server_answers_serves_every_run_and_goes_with_the_process(tmp_path):
    import psutil

    proc = _server_script(tmp_path)
    try:
        got = json.loads(proc.stdout.readline())
        assert got["url"].startswith("http://127.0.0.1:") and got["status"] == 200
        assert got["again"] == got["url"]  # one server for the process's runs
        assert _servers_of(str(tmp_path / "prefect")) == [got["pid"]]
    finally:
        proc.communicate("\n", timeout=60)
    assert proc.returncode == 0
    assert not psutil.pid_exists(got["pid"]) or psutil.Process(got["pid"]).status() == "zombie"
    assert not _servers_of(str(tmp_path / "prefect"))


def test_temporary_server_is_not_started_with_an_api_url(tmp_path):
    proc = _server_script(tmp_path, PREFECT_API_URL="http://127.0.0.1:9/api")
    out, _ = proc.communicate("\n", timeout=120)
    assert json.loads(out) == {"url": None, "server": False}
    assert not _servers_of(str(tmp_path / "prefect"))


def test_temporary_server_that_fails_gives_a_clear_error(tmp_path):
    # A database the server cannot open: it exits during start-up.
    proc = _server_script(tmp_path, PREFECT_API_DATABASE_CONNECTION_URL=(
        f"sqlite+aiosqlite:///{tmp_path}/no/such/folder/prefect.db"))
    out, _ = proc.communicate("\n", timeout=300)
    err = json.loads(out)["error"]
    assert "temporary API server exited with status" in err and "PREFECT_API_URL" in err


def wait_for(url: str, seconds: float) -> None:
    end = time.time() + seconds
    while time.time() < end:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url} did not come up in {seconds} s")


@pytest.mark.slow
def test_cron_deployment_on_a_prefect_server_runs(tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = env_for(tmp_path, PREFECT_API_URL=api)
    prefect = str(Path(sys.executable).parent / "prefect")
    server = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    serve = None
    try:
        wait_for(f"{api}/health", 120)
        cfg_path = make_caption_corpus(tmp_path / "in", 6, max_samples=5)
        serve = subprocess.Popen([CLI, "schedule", "-c", str(cfg_path), "-o", str(tmp_path / "out"),
                                  "--cron", "0 2 * * *", "--name", "nightly-test",
                                  "--stages", "none"], env=env, cwd=REPO,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        script = """
import asyncio, sys, time
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment

async def main():
    async with get_client() as c:
        for _ in range(90):
            try:
                d = await c.read_deployment_by_name("vita-corpus-build/nightly-test")
                break
            except Exception:
                time.sleep(1)
        else:
            sys.exit("no deployment")
        crons = [s.schedule.cron for s in d.schedules]
        print("CRON", crons)
    run = await run_deployment("vita-corpus-build/nightly-test", timeout=400)
    print("STATE", run.state.type.value)

asyncio.run(main())
"""
        proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                              text=True, timeout=560)
        assert "CRON ['0 2 * * *']" in proc.stdout, proc.stdout + proc.stderr[-2000:]
        assert "STATE COMPLETED" in proc.stdout, proc.stdout + proc.stderr[-2000:]
        report = json.loads((tmp_path / "out" / "report" / "build_report.json").read_text())
        assert report["sources"]["cap"]["written"] == 6
    finally:
        for p in (serve, server):
            if p is not None:
                p.terminate()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
