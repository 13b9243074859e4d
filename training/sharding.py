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
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger("vita_corpus.training")


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
