"""Sharded training (--fsdp): FSDP2 on gloo against unsharded runs, activation checkpointing,
and DCP checkpoints that resume on another number of processes."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flows.build.pipeline import build
from flows.corpora.demo import make_demo_inputs
from flows.validation.gate import validate
from schemas.config import load_config
from schemas.recipes import DEFAULT_RECIPES
from training import checkpoint as ckpt
from training import sharding
from training.config import RunConfig
from training.data import list_shards
from training.loop import TrainingRefused, build_start, freeze, train
from training.stages import plan_for

CLI = str(Path(sys.executable).parent / "vita-corpus")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fsdp")
    cfg = load_config(make_demo_inputs(root / "inputs"))
    build(cfg, str(root / "out"), stages=[r for r in DEFAULT_RECIPES if r.stage in ("1.3", "2.2")])
    assert all(v["passed"] for v in validate(str(root / "out")).values())
    return root / "out"


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt.latest(run) / "model.safetensors"))


def assert_same_run(a: Path, b: Path, rel: float, atol: float) -> None:
    ma, mb = metrics(a), metrics(b)
    assert [r["step"] for r in ma] == [r["step"] for r in mb]
    assert [r["samples"] for r in ma] == [r["samples"] for r in mb]
    for x, y in zip(ma, mb, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=rel), (x["step"], x["loss"], y["loss"])
    wa, wb = weights(a), weights(b)
    assert set(wa) == set(wb)
    worst = max(((wa[k] - wb[k]).abs().max().item(), k) for k in wa)
    assert worst[0] < atol, worst


def test_one_process_fsdp_with_activation_checkpointing_matches_plain_training(demo, tmp_path):
    """Stage 2.2, one sample a step: a step without audio runs the (trainable) audio encoder on a
    blank clip under FSDP and drops its zero gradients, as plain training leaves it unused."""
    shards = demo / "stage_2.2"
    cfg = dict(stage="2.2", steps=4, batch_size=1, save_every=2, lr=3e-3)
    plain, sharded = tmp_path / "plain", tmp_path / "fsdp"
    train(shards, plain, RunConfig(**cfg), from_scratch=True)
    summary = train(shards, sharded, RunConfig(**cfg, fsdp=True, activation_checkpointing=True),
                    from_scratch=True)
    assert summary["fsdp"] is True
    assert {len(r["samples"]) for r in metrics(sharded)} == {1}
    assert_same_run(plain, sharded, rel=1e-5, atol=1e-5)
    mid, end = sharded / "checkpoints" / "step_000002", sharded / "checkpoints" / "step_000004"
    assert sharding.is_sharded(mid) and not (mid / "model.safetensors").exists()
    assert sharding.is_sharded(end) and (end / "model.safetensors").is_file()  # the last one whole too
    assert json.loads((end / "state.json").read_text())["sharded"] is True
    # frozen modules have no optimizer state
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(end / "dcp")).read_metadata().state_dict_metadata
    optim = [k for k in keys if k.startswith("optim.state.")]
    assert any(".llm." in k or k.startswith("optim.state.llm.") for k in optim)
    frozen = plan_for("2.2").frozen
    assert frozen and not [k for k in optim if k.split(".")[2] in frozen]
    # a mid-run sharded checkpoint loads into an unsharded model (as --init would)
    torch.manual_seed(0)
    model, *_ = build_start(sharded, plan_for("2.2"), [], None, sharded, weights=False)
    ckpt.load_weights(model, mid)
    ref = load_file(str(plain / "checkpoints" / "step_000002" / "model.safetensors"))
    got = model.state_dict()
    assert max((got[k] - ref[k]).abs().max().item() for k in ref) < 1e-5


def model_states_gb(demo: Path, stage: str) -> float:
    """What one process holds for the stage's model unsharded (training.sharding.state_bytes),
    the model built as a from-scratch run builds it."""
    plan = plan_for(stage)
    torch.manual_seed(0)
    model, *_ = build_start(demo, plan, list_shards(demo / f"stage_{stage}"), None, None)
    freeze(model, plan)
    return sharding.state_bytes(model) / sharding.GB


def test_memory_plan_shards_only_what_does_not_fit():
    """The sharding decision on a module of known size: 1,000 trainable and 100 frozen
    parameters are 16,400 bytes of states."""
    net = torch.nn.Sequential(torch.nn.Linear(10, 100, bias=False), torch.nn.Linear(10, 10, bias=False))
    net[1].requires_grad_(False)
    assert sharding.state_bytes(net) == 1000 * 16 + 100 * 4
    need = 16_400 / sharding.GB
    on_cpu = sharding.plan_memory(net, False, 2, None)
    assert not on_cpu.fsdp and "not known" in on_cpu.reason
    asked = sharding.plan_memory(net, True, 1, None)
    assert asked.fsdp and asked.reason == "--fsdp"
    roomy = sharding.plan_memory(net, False, 4, need / sharding.FIT_SHARE * 2)
    assert not roomy.fsdp and roomy.reason.startswith("fits")
    tight = need / sharding.FIT_SHARE / 3  # a third of what it needs: 3 processes or more
    chosen = sharding.plan_memory(net, False, 4, tight)
    assert chosen.fsdp and chosen.per_process_gb == pytest.approx(need / 4)
    assert chosen.model_gb == pytest.approx(need) and chosen.world == 4
    with pytest.raises(sharding.DoesNotFit, match="at least 3 processes"):
        sharding.plan_memory(net, False, 1, tight)
    with pytest.raises(sharding.DoesNotFit, match="even sharded over 2"):
        sharding.plan_memory(net, False, 2, tight)
    with pytest.raises(sharding.DoesNotFit, match="checkpoint to resume is whole"):
        sharding.plan_memory(net, False, 4, tight, resuming_whole=True)


def test_a_model_that_does_not_fit_one_process_is_refused_with_both_figures(demo, tmp_path):
    need = model_states_gb(demo, "1.3")
    small = need / sharding.FIT_SHARE / 2.5
    with pytest.raises(TrainingRefused) as err:
        train(demo / "stage_1.3", tmp_path / "run", RunConfig(stage="1.3", steps=1, memory_gb=small),
              from_scratch=True)
    said = str(err.value)
    assert f"{need:.2f} GB" in said and f"{small:.1f} GB device" in said
    assert "at least 3 processes" in said
    assert not (tmp_path / "run" / "checkpoints").exists()
    # on a device that holds it, the same run trains unsharded and records why
    summary = train(demo / "stage_1.3", tmp_path / "ok", RunConfig(stage="1.3", steps=1,
                    memory_gb=need / sharding.FIT_SHARE * 2), from_scratch=True)
    assert summary["fsdp"] is False and summary["sharding"]["reason"].startswith("fits")


def _torchrun(nproc: int, args: list[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
         "--master-addr", "127.0.0.1", "--master-port", str(port), CLI, *args],
        capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_two_process_fsdp_matches_one_process_and_resumes_on_two_then_one(demo, tmp_path):
    """`torchrun --nproc-per-node 2 vita-corpus train --fsdp` (gloo) against one process running
    the same two data ranks as micro-batches (--grad-accum 2); then the 2-process run killed
    after its step-2 checkpoint, resumed on 2 processes for a step and on 1 for the last."""
    base = ["train", "--stage", "1.3", "--shards", str(demo / "stage_1.3"), "--batch-size", "1",
            "--from-scratch", "--device", "cpu", "--lr", "3e-3"]
    two, one = tmp_path / "two", tmp_path / "one"
    # no --fsdp: a device too small for the model unsharded, big enough for half of it, makes
    # the trainer choose FSDP itself
    memory_gb = model_states_gb(demo, "1.3") / sharding.FIT_SHARE / 1.5
    _torchrun(2, [*base, "--out", str(two), "--steps", "4", "--save-every", "2",
                  "--memory-gb", f"{memory_gb:.9f}"])
    proc = subprocess.run([CLI, *base, "--out", str(one), "--steps", "4", "--grad-accum", "2"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["micro_batches"] == 2 and summary["fsdp"]
    assert summary["sharding"]["reason"].startswith("chosen:"), summary["sharding"]
    assert json.loads((two / "config.json").read_text())["sharding"]["fsdp"] is True
    assert {len(r["samples"]) for r in metrics(two)} == {2}  # one sample from each rank
    assert_same_run(two, one, rel=1e-4, atol=1e-4)

    # the 2-process run as a crash after the step-2 checkpoint would have left it
    cut = tmp_path / "cut"
    shutil.copytree(two, cut)
    shutil.rmtree(cut / "checkpoints" / "step_000004")
    (cut / "latest").write_text("step_000002")
    (cut / "summary.json").unlink()
    (cut / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics(two)[:2]))
    _torchrun(2, [*base, "--out", str(cut), "--steps", "3", "--fsdp", "--resume"])
    proc = subprocess.run([CLI, *base, "--out", str(cut), "--steps", "4", "--fsdp", "--resume"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((cut / "summary.json").read_text())["world_size"] == 1
    state = json.loads((ckpt.latest(cut) / "state.json").read_text())
    assert state["world_size"] == 1 and set(state["position"]) == {"0", "1"}  # both readers kept
    assert_same_run(two, cut, rel=1e-6, atol=1e-6)
    # a width the processes cannot split is refused
    proc = subprocess.run([CLI, *base, "--out", str(one), "--steps", "5", "--resume", "--grad-accum", "1"],
                          capture_output=True, text=True, timeout=900)
    said = " ".join((proc.stdout + proc.stderr).split())  # rich wraps long lines
    assert proc.returncode == 2 and "changes the run's data-parallel width 2" in said
