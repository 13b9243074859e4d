"""Run folders: the config, tokenizer, shard verdict, metrics and checkpoints of one stage.

```
RUN/config.json        model config, run config, stage plan, LLM config, where it started from
RUN/tokenizer.json     the tokenizer (trained on the stage's text, or copied from a local one)
RUN/verdict.json       the validation verdict of the shards it trained on
RUN/metrics.jsonl      one line per logged step
RUN/checkpoints/step_000100/model.safetensors, optimizer.pt, state.json
RUN/latest             the newest complete checkpoint's folder name
RUN/vision_tower/      a pretrained vision tower's config files (not weights), when one is used
```
With `--fsdp` a checkpoint holds dcp/ instead (torch.distributed.checkpoint: one file per
process, loadable on any number of processes), and the run's last checkpoint also a whole
model.safetensors (training.sharding).
A checkpoint folder is written under a temporary name and renamed, and `latest` is replaced
atomically after it, so a crash mid-save leaves the previous checkpoint in charge.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from storage.uri import write_bytes_atomic


def latest(run: str | Path) -> Path | None:
    p = Path(run) / "latest"
    if not p.is_file():
        return None
    ck = Path(run) / "checkpoints" / p.read_text().strip()
    complete = (ck / "model.safetensors").is_file() or (ck / "dcp" / ".metadata").is_file()
    return ck if complete else None


def staging(run: str | Path, step: int, tag: str | None = None) -> Path:
    """A fresh temporary folder for checkpoint `step` (`tag`: a name all processes agree on)."""
    root = Path(run) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".step_{step:06d}.tmp-{tag or os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def commit(run: str | Path, step: int, tmp: Path, state: dict[str, Any]) -> Path:
    """Write state.json, rename the staging folder into place, then point `latest` at it."""
    name = f"step_{step:06d}"
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1))
    final = Path(run) / "checkpoints" / name
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    write_bytes_atomic(str(Path(run) / "latest"), name.encode())
    return final


def save(run: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
         state: dict[str, Any]) -> Path:
    tmp = staging(run, step)
    save_model(model, str(tmp / "model.safetensors"))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    return commit(run, step, tmp, state)


def load_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    if not (checkpoint / "model.safetensors").is_file():  # a sharded checkpoint mid-run
        from training import sharding

        sharding.load(checkpoint, model, None)
        return
    missing, unexpected = load_model(model, str(checkpoint / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise ValueError(f"{checkpoint}: checkpoint does not fit this model (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}); was it made with another model config?")


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_bytes_atomic(str(path), json.dumps(data, indent=1, sort_keys=True).encode())
