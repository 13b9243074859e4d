"""Sharded training (`--fsdp`): FSDP2 per transformer block, activation checkpointing, and
sharded checkpoints with torch.distributed.checkpoint (DCP).

Every `layers` list of the model (the LLM's decoder layers, the vision tower's and the audio
encoder's encoder layers, the speech decoders' LLaMA layers) becomes one FSDP unit; the root
unit holds the rest (embeddings, heads, adapters, codec). On CUDA the blocks compute with bf16
parameters and reduce gradients in fp32; the root unit keeps fp32 parameters (the codec and the
fbank run in fp32 on purpose; autocast gives their matmuls bf16 speed anyway). On a CPU nothing
is cast.

A DCP checkpoint is one file per process plus metadata; it loads on any number of processes
(each reads the slices it owns), and also into an unsharded model, so a run saved on two
processes resumes on one. The last checkpoint of a run also gets a whole-model
model.safetensors, which the next stage and other tools read.

Without --fsdp the trainer still decides (`plan_memory`): it estimates what one process holds
for the model unsharded (fp32 weights of every parameter; fp32 gradients and AdamW's two moments
for the trainable ones: 16 bytes a trainable parameter, 4 a frozen one; activations not counted)
against the device's memory (a GPU's total, or --memory-gb). A model that does not fit is
sharded when several processes run; on one process the run is refused with both figures and
the number of processes sharding would need.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger("vita_corpus.training")


# the share of the device the model's states may take; the rest is left for activations,
# the CUDA context and the allocator's slack
FIT_SHARE = 0.7
GB = 1e9


@dataclass(frozen=True)
class MemoryPlan:
    fsdp: bool  # shard (FSDP2) or not
    reason: str  # why, in words (logged and written to the run's config.json)
    model_gb: float  # what one process holds for the model unsharded
    per_process_gb: float  # ... and with FSDP over `world` processes
    device_gb: float | None  # the memory planned for (None: not known, e.g. a CPU without --memory-gb)
    world: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DoesNotFit(RuntimeError):
    """The model's states do not fit the device, even sharded over the processes running."""


def state_bytes(model: nn.Module) -> int:
    """Bytes one process holds for the model's states unsharded: 4 (fp32 weights) per parameter,
    and 12 more (fp32 gradient, AdamW's two moments) per trainable one; tied weights once."""
    total, seen = 0, set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * (16 if p.requires_grad else 4)
    return total


def plan_memory(model: nn.Module, requested: bool, world: int, device_gb: float | None,
                resuming_whole: bool = False) -> MemoryPlan:
    """Shard or not: --fsdp given; or the model's states exceed FIT_SHARE of the device and
    several processes run (refused, raising DoesNotFit, when one process runs or when even
    sharded they would not fit). A resume of a whole-model checkpoint stays unsharded."""
    need = state_bytes(model) / GB
    per = need / max(1, world)
    room = None if device_gb is None else FIT_SHARE * device_gb
    if requested:
        return MemoryPlan(True, "--fsdp", need, per, device_gb, world)
    if room is None:
        return MemoryPlan(False, "device memory not known (a CPU): not sharded unless --fsdp",
                          need, need, device_gb, world)
    if need <= room:
        return MemoryPlan(False, f"fits: {need:.2f} GB of model states on a {device_gb:.1f} GB "
                          "device", need, need, device_gb, world)
    at_least = math.ceil(need / room)
    if resuming_whole:
        raise DoesNotFit(
            f"the model's states need {need:.2f} GB, more than {FIT_SHARE:.0%} of the {device_gb:.1f} "
            "GB device, and the checkpoint to resume is whole (a run without --fsdp): resume it "
            "where it fits, or start a sharded run")
    if world == 1:
        raise DoesNotFit(
            f"the model's states need {need:.2f} GB (fp32 weights, gradients and AdamW moments of "
            f"the trainable parts), more than {FIT_SHARE:.0%} of the {device_gb:.1f} GB device; "
            f"run under torchrun on at least {at_least} processes (FSDP is then chosen), or "
            "freeze more of the model")
    if per > room:
        raise DoesNotFit(
            f"the model's states need {need:.2f} GB, {per:.2f} GB per process even sharded over "
            f"{world}, more than {FIT_SHARE:.0%} of the {device_gb:.1f} GB device; run on at "
            f"least {at_least} processes")
    return MemoryPlan(True, f"chosen: {need:.2f} GB of model states do not fit {FIT_SHARE:.0%} "
                      f"of the {device_gb:.1f} GB device; {per:.2f} GB per process sharded over "
                      f"{world}", need, per, device_gb, world)


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: the items of every ModuleList named `layers`."""
    return [b for name, m in model.named_modules()
            if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers" for b in m]


def checkpoint_activations(model: nn.Module) -> int:
    """Recompute each block's activations in backward instead of keeping them (apply before
    sharding); returns the number of blocks."""
    from torch.distributed._composable import checkpoint

    found = blocks(model)
    for b in found:
        checkpoint(b)
    return len(found)


def shard(model: nn.Module, device: torch.device, world: int) -> int:
    """fully_shard each block, then the root; returns the number of block units."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,))
    if device.type == "cuda":
        block_mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        root_mp = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    else:
        block_mp = root_mp = MixedPrecisionPolicy()
    found = blocks(model)
    for b in found:
        fully_shard(b, mesh=mesh, mp_policy=block_mp)
    fully_shard(model, mesh=mesh, mp_policy=root_mp)
    return len(found)


def is_sharded(checkpoint: Path) -> bool:
    return (checkpoint / "dcp" / ".metadata").is_file()


def save(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every process writes its slices of the weights and optimizer state to folder/dcp."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(folder / "dcp"))


def load(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Weights (and optimizer state) from folder/dcp into a sharded or whole model, on any
    number of processes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
        dcp.load(state, checkpoint_id=str(folder / "dcp"))
        set_model_state_dict(model, state["model"])
        return
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(folder / "dcp"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU of rank 0 (a collective; other ranks get {}), with
    tied weights kept once, as safetensors wants."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    for names in groups.values():
        for extra in names[1:]:
            sd.pop(extra, None)
    return {k: v.contiguous() for k, v in sd.items()}


def describe(model: nn.Module) -> dict[str, Any]:
    units = blocks(model)
    return {"units": len(units) + 1, "block_types": sorted({type(b).__name__ for b in units})}
