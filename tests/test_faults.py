"""Faults in the middle of a flow run: a Ray worker killed, the flow process killed.

Either way the finished output must be the uninterrupted build's: the same tars byte for byte,
the same samples once each, the same rejects, and no temporary file left behind.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import psutil
import pytest

from flows.build.pipeline import build, ingest, source_fingerprint
from flows.build.plan import leading_ranges
from schemas.config import load_config
from storage.parts import list_manifests

from conftest import (
    CLI,
    REPO,
    add_source,
    env_for,
    make_caption_corpus,
    tar_keys,
    tars,
    temp_leftovers,
)

N, PER_PART = 160, 4  # records, samples per part: 146 samples in 40 parts (ranges of 4 inputs)
PARTITION = 20  # inputs per partition task: 8 of them, 5 ranges each


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """(config, the uninterrupted build's OUT)."""
    root = tmp_path_factory.mktemp("faults")
    cfg = make_caption_corpus(root / "in", N, max_samples=PER_PART, bad_every=11,
                              image_size=(320, 240))
    build(load_config(cfg), str(root / "plain"))
    return cfg, root / "plain"


def start_flow(cfg: Path, out: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen(flow_cmd(cfg, out), env=env, cwd=REPO, stdout=f, stderr=f,
                                start_new_session=True)


def flow_cmd(cfg: Path, out: Path) -> list[str]:
    return [CLI, "run", "-c", str(cfg), "-o", str(out), "--stages", "none", "--num-cpus", "2",
            "--partition-size", str(PARTITION)]


def committed(out: Path) -> int:
    """Parts committed so far (each range of 4 inputs is one part here)."""
    return len(list((out / "ingest").glob("cap-*.manifest.json")))


def resume_point(out: Path) -> tuple[int, int]:
    """(the input a rerun resumes from, the committed parts it keeps before it), by the config
    the build saved in OUT (the one its parts were fingerprinted with)."""
    c = load_config(out / "corpus.yaml")
    kept = leading_ranges(list_manifests(str(out), "ingest", "cap"),
                          source_fingerprint(c, c.sources[0]), PER_PART)
    return (kept[-1].input_end if kept else 0), len(kept)


def transform_workers_once_written(proc: subprocess.Popen, out: Path, log: Path,
                                   partitions: int = 2) -> list[psutil.Process]:
    """Wait until `partitions` partitions' worth of parts are committed and a Ray worker runs
    another partition's task (the build is under way); return the workers running one."""
    end = time.time() + 300
    while time.time() < end:
        assert proc.poll() is None, log.read_text()[-3000:]
        if (committed(out) >= partitions * PARTITION // PER_PART
                and (found := ray_workers(proc, "transform_task"))):
            return found
        time.sleep(0.02)
    raise AssertionError(f"no worker writing after {partitions} partitions in 300 s:\n"
                         f"{log.read_text()[-3000:]}")


def ray_workers(proc: subprocess.Popen, task: str) -> list[psutil.Process]:
    """The flow's Ray workers (its descendants) now running `task`."""
    found = []
    for p in psutil.Process(proc.pid).children(recursive=True):
        try:
            if p.cmdline()[:1] == [f"ray::{task}"]:
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def kill_tree(proc: subprocess.Popen, known: Sequence[psutil.Process] = ()) -> None:
    """SIGKILL a flow command and whatever it started (`known`, and its descendants now)."""
    procs = list(known)
    if proc.poll() is None:
        procs += [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
    proc.wait(timeout=30)


def assert_same_as_uninterrupted(out: Path, plain: Path) -> dict:
    keys = tar_keys(out)
    assert keys == tar_keys(plain) and len(keys) == len(set(keys)) == 146
    assert tars(out) == tars(plain)
    assert ({p.name: p.read_bytes() for p in (out / "rejects").iterdir()}
            == {p.name: p.read_bytes() for p in (plain / "rejects").iterdir()})
    assert temp_leftovers(out) == []
    report = json.loads((out / "report" / "build_report.json").read_text())
    assert report["accounted"]
    assert report["totals"] == json.loads((plain / "report" / "build_report.json")
                                          .read_text())["totals"]
    return report


@pytest.mark.slow
def test_a_ray_worker_killed_mid_transform(tmp_path, corpus):
    cfg, plain = corpus
    out, log = tmp_path / "out", tmp_path / "run.log"
    proc = start_flow(cfg, out, env_for(tmp_path), log)
    try:
        worker = transform_workers_once_written(proc, out, log)[0]
        killed_partition = worker.cmdline()
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        kill_tree(proc)
    assert killed_partition[:1] == ["ray::transform_task"]  # still writing when killed
    report = assert_same_as_uninterrupted(out, plain)
    # Ray ran the killed partition again on a new worker, which cleared what the dead one had
    # written of its ranges: no task failed for good, the flow wrote nothing itself.
    parts = report["partitions"]["sources"]["cap"]
    assert parts["tasks"] == N // PARTITION and parts["failed"] == 0
    assert parts["records"] == N and parts["written_by_flow"] == 0


@pytest.mark.slow
def test_the_flow_process_killed_mid_build_then_rerun(tmp_path, corpus):
    cfg, plain = corpus
    out, log = tmp_path / "out", tmp_path / "run.log"
    env = env_for(tmp_path)
    proc = start_flow(cfg, out, env, log)
    try:
        writing = transform_workers_once_written(proc, out, log)
        started = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        # The Ray workers die with their driver (Ray fate-shares them), so nothing of the
        # killed run writes during the rerun; what lingers (Prefect's temporary server, Ray's
        # agents) is stopped here.
        _, alive = psutil.wait_procs(writing, timeout=30)
        assert not alive
        kill_tree(proc, started)
    finally:
        kill_tree(proc)
    # Killed mid-build: the leading whole ranges are committed; partitions that finished out of
    # order, and the ones under way, are not kept (at most the window of tasks submitted).
    resume, kept = resume_point(out)
    assert resume < N and kept == resume // PER_PART
    rerun = subprocess.run(flow_cmd(cfg, out), env=env, cwd=REPO, capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    report = assert_same_as_uninterrupted(out, plain)
    # The rerun kept the committed ranges before the resume point and planned the rest.
    parts = report["partitions"]["sources"]["cap"]
    assert report["sources"]["cap"]["parts_reused"] == kept
    assert parts["inputs_kept"] == resume
    assert parts["records"] == parts["transformed"] == N - resume
    assert parts["written_by_flow"] == 0


def test_a_source_resuming_clears_only_its_own_temporary_files(tmp_path):
    """What a Ray task retried after its worker was killed meets: its dead attempt's temporary
    files, beside those of another source still being written."""
    cfg_path = add_source(make_caption_corpus(tmp_path / "in", 12, max_samples=5, bad_every=5),
                          "other", "cap")
    out = tmp_path / "out"
    build(load_config(cfg_path), str(out))
    before = tars(out)
    dead = [out / "ingest" / "cap-00001-00.tar.tmp-123-0badf00d",
            out / "rejects" / "cap-00002-00.rejects.jsonl.tmp-123-0badf00d"]
    alive = out / "ingest" / "other-00001-00.tar.tmp-456-5eed5eed"
    for p in (*dead, alive):
        p.write_bytes(b"half a part")
    stats, _ = ingest(load_config(out / "corpus.yaml"), str(out), sources=["cap"])
    assert stats[0].parts_reused == stats[0].parts == 3
    assert not any(p.exists() for p in dead)
    assert alive.exists()
    assert tars(out) == before
