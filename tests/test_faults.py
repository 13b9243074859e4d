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

from flows.build import build, ingest, leading_parts, source_fingerprint
from flows.partitions import CHUNK, chunk_end
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

N, PER_PART = 160, 4  # records, samples per part: 146 samples in 37 parts, several seconds of work
PARTITION = 20  # inputs per transform task: 8 of them


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


def finished(out: Path) -> int:
    """Partitions whose task has ended (the flow marks each one for the shard task)."""
    return len(list((out / "staging" / "ingest" / "cap").glob("*.ready")))


def staged(out: Path) -> set[tuple[int, int]]:
    """(partition, chunk) of the staging files there (staged, not yet in committed parts)."""
    return {tuple(map(int, p.stem.split("-")))
            for p in (out / "staging" / "ingest" / "cap").glob("*.pkl")}


def resume_point(cfg: Path, out: Path) -> tuple[int, int]:
    """(the input a rerun resumes from, the committed parts it keeps before it)."""
    c = load_config(cfg)
    kept = leading_parts(list_manifests(str(out), "ingest", "cap"),
                         source_fingerprint(c, c.sources[0]))
    return (kept[-1].input_end if kept else 0), len(kept)


def transform_workers_once_finished(proc: subprocess.Popen, out: Path, log: Path,
                                    partitions: int = 2) -> list[psutil.Process]:
    """Wait until `partitions` partition tasks have ended, a staging file is still there and a
    Ray worker runs another partition's transforms (the build is under way); return the
    workers running transforms."""
    end = time.time() + 300
    while time.time() < end:
        assert proc.poll() is None, log.read_text()[-3000:]
        if (finished(out) >= partitions and staged(out)
                and (found := ray_workers(proc, "transform_task"))):
            return found
        time.sleep(0.02)
    raise AssertionError(f"no worker transforming after {partitions} partitions in 300 s:\n"
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
        worker = transform_workers_once_finished(proc, out, log)[0]
        killed_partition = worker.cmdline()
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        kill_tree(proc)
    assert killed_partition[:1] == ["ray::transform_task"]  # still transforming when killed
    report = assert_same_as_uninterrupted(out, plain)
    # Ray ran the killed partition again on a new worker: every partition ended staged, so the
    # shard task transformed nothing itself; the staging folder went once the parts were in.
    parts = report["partitions"]["sources"]["cap"]
    assert parts["tasks"] == N // PARTITION and parts["failed"] == 0
    assert parts["records"] == N and parts["transformed_by_shard_task"] == 0
    assert not (out / "staging").exists()


@pytest.mark.slow
def test_the_flow_process_killed_mid_build_then_rerun(tmp_path, corpus):
    cfg, plain = corpus
    out, log = tmp_path / "out", tmp_path / "run.log"
    env = env_for(tmp_path)
    proc = start_flow(cfg, out, env, log)
    try:
        transforming = transform_workers_once_finished(proc, out, log)
        started = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        # The Ray workers die with their driver (Ray fate-shares them), so nothing of the
        # killed run writes during the rerun; what lingers (Prefect's temporary server, Ray's
        # agents) is stopped here.
        _, alive = psutil.wait_procs(transforming, timeout=30)
        assert not alive
        kill_tree(proc, started)
    finally:
        kill_tree(proc)
    # Killed mid-build: the shard task had followed the partitions that had ended, and their
    # staging files went as their inputs reached committed parts; the rest stayed.
    (resume, kept), left = resume_point(cfg, out), staged(out)
    assert resume < N
    reusable = sum(max(0, chunk_end(k, c, PARTITION) - max(k * PARTITION + c * CHUNK, resume))
                   for k, c in left)
    rerun = subprocess.run(flow_cmd(cfg, out), env=env, cwd=REPO, capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    report = assert_same_as_uninterrupted(out, plain)
    # The rerun kept the committed parts and the staged results after them, and transformed
    # only the rest.
    parts = report["partitions"]["sources"]["cap"]
    assert report["sources"]["cap"]["parts_reused"] == kept
    assert parts["reused"] == reusable
    assert parts["transformed"] == N - resume - reusable
    assert parts["transformed_by_shard_task"] == 0


def test_a_source_resuming_clears_only_its_own_temporary_files(tmp_path):
    """What a Ray task retried after its worker was killed meets: its dead attempt's temporary
    files, beside those of another source still being written."""
    cfg_path = add_source(make_caption_corpus(tmp_path / "in", 12, max_samples=5, bad_every=5),
                          "other", "cap")
    out = tmp_path / "out"
    build(load_config(cfg_path), str(out))
    before = tars(out)
    dead = [out / "ingest" / "cap-00001.tar.tmp-123-0badf00d",
            out / "rejects" / "cap-00002.rejects.jsonl.tmp-123-0badf00d"]
    alive = out / "ingest" / "other-00001.tar.tmp-456-5eed5eed"
    for p in (*dead, alive):
        p.write_bytes(b"half a part")
    stats, _ = ingest(load_config(cfg_path), str(out), sources=["cap"])
    assert stats[0].parts_reused == stats[0].parts == 2
    assert not any(p.exists() for p in dead)
    assert alive.exists()
    assert tars(out) == before
