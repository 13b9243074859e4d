"""Pretrained vision towers from local folders: SigLIP, CLIP and InternViT-style encoders.

`vision_path` in the model config names a transformers folder: a SigLIP or CLIP vision model (or
a whole SigLIP/CLIP model, whose vision half is taken), or a folder that carries its own code
(`auto_map` in config.json and the .py files beside it, as InternViT-300M's folder does), which
loads through AutoModel with trust_remote_code. Nothing is downloaded.

The folder decides the tower's input size, patch size, width and normalisation (image_mean and
image_std from preprocessor_config.json); the 2x2 pixel shuffle and the adapter are sized from
it, and so are the tokens per tile. Tiles keep the size the shards were built with
(ModelConfig.image_size); a tower made for another size is refused unless `vision_resize` asks
for the tiles to be resized to the tower's size inside the model.

A run folder keeps the tower's config files (not its weights) in RUN/vision_tower/, so the next
stage and a resumed run rebuild the same architecture and load the weights from the checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("vita_corpus.training")

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # InternViT's normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)
# the normalisation each kind of tower was trained with, when its folder has no preprocessor config
_DEFAULT_NORM = {"siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "SigLIP's 0.5 / 0.5"),
                 "clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "OpenAI CLIP's"),
                 "remote": (IMAGENET_MEAN, IMAGENET_STD, "ImageNet's (InternViT's)")}
_KINDS = {"siglip_vision_model": "siglip", "siglip": "siglip",
          "clip_vision_model": "clip", "clip": "clip"}
CONFIG_FILES = ("config.json", "preprocessor_config.json")
# the model settings a tower folder decides
TOWER_FIELDS = ("patch_size", "vision_hidden", "vision_layers", "vision_heads",
                "vision_image_size", "image_mean", "image_std")


class TowerError(ValueError):
    """A vision folder that cannot serve as the tower; the message names the values and the fix."""


@dataclass(frozen=True)
class TowerFacts:
    kind: str  # siglip | clip | remote (the folder's own code through AutoModel)
    model_type: str
    image_size: int
    patch_size: int
    hidden: int
    layers: int
    heads: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    norm_from: str  # where mean and std came from

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def inspect(folder: str | Path) -> TowerFacts:
    """What a tower folder says about itself (config files only; no weights, no torch)."""
    folder = Path(folder)
    cfg = _read(folder / "config.json")
    if not cfg:
        raise TowerError(f"vision_path {folder} has no config.json; give a local transformers "
                         "folder of a SigLIP, CLIP or InternViT-style vision model")
    model_type = cfg.get("model_type", "?")
    if "AutoModel" in (cfg.get("auto_map") or {}):
        kind = "remote"
        if not list(folder.glob("*.py")):
            raise TowerError(f"{folder}/config.json maps AutoModel to "
                             f"{cfg['auto_map']['AutoModel']}, but the folder carries no .py "
                             "files; copy the model's code files into it (nothing is downloaded)")
    elif model_type in _KINDS:
        kind = _KINDS[model_type]
    else:
        raise TowerError(f"vision_path {folder} holds a {model_type!r} model; supported: SigLIP "
                         "and CLIP (vision or whole models), or a folder with its own code "
                         "(auto_map AutoModel, e.g. InternViT-300M)")
    vision = cfg.get("vision_config") if model_type in ("siglip", "clip") else cfg
    vision = vision or {}
    try:
        image_size, patch = int(vision["image_size"]), int(vision["patch_size"])
        hidden = int(vision["hidden_size"])
    except KeyError as err:
        raise TowerError(f"{folder}/config.json lacks the vision setting {err}") from None
    pre = _read(folder / "preprocessor_config.json")
    if "image_mean" in pre and "image_std" in pre:
        mean, std, norm_from = tuple(pre["image_mean"]), tuple(pre["image_std"]), "preprocessor_config.json"
    else:
        mean, std, name = _DEFAULT_NORM[kind]
        norm_from = f"{name} default (the folder has no preprocessor_config.json)"
    return TowerFacts(kind, model_type, image_size, patch, hidden,
                      int(vision.get("num_hidden_layers", 0)), int(vision.get("num_attention_heads", 0)),
                      tuple(float(x) for x in mean), tuple(float(x) for x in std), norm_from)


def values(facts: TowerFacts) -> dict[str, Any]:
    """The model settings the tower decides (see TOWER_FIELDS)."""
    return {"patch_size": facts.patch_size, "vision_hidden": facts.hidden,
            "vision_layers": facts.layers, "vision_heads": facts.heads,
            "vision_image_size": facts.image_size, "image_mean": list(facts.mean),
            "image_std": list(facts.std)}


def check_fit(facts: TowerFacts, tile_size: int, resize: bool, folder: str | Path) -> None:
    """Refuse a tower that does not fit the tiles (unless resizing is asked for) or whose
    patch grid the 2x2 pixel shuffle cannot fold."""
    if facts.grid % 2:
        raise TowerError(
            f"the vision tower at {folder} gives a {facts.grid}x{facts.grid} patch grid "
            f"({facts.image_size} px / patch {facts.patch_size}); the 2x2 pixel shuffle needs an "
            "even grid: use a tower whose image_size / patch_size is even (e.g. 448/14, 224/14)")
    if facts.image_size != tile_size and not resize:
        raise TowerError(
            f"the vision tower at {folder} takes {facts.image_size} px images but the tiles are "
            f"{tile_size} px (image_size); use a tower made for {tile_size} px, set "
            f"`vision_resize: true` to resize each tile to {facts.image_size} px in the model "
            f"({(facts.grid // 2) ** 2} tokens per tile), or build the shards with {facts.image_size} px "
            "tiles and frames (transforms.tiling.image_size and transforms.video.frame_size in the "
            f"corpus config) and set image_size: {facts.image_size}")
    if facts.image_size % facts.patch_size:
        raise TowerError(f"{folder}: image_size {facts.image_size} is not a multiple of "
                         f"patch_size {facts.patch_size}")


def resolve(cfg: Any, explicit: set[str] | None = None) -> Any:
    """`cfg` (a ModelConfig with vision_path) with the tower's settings filled in. A setting the
    user gave explicitly (`explicit`: the keys of their model YAML) that the folder contradicts is
    refused, naming both values."""
    facts = inspect(cfg.vision_path)
    found = values(facts)
    clash = [f"{k} {getattr(cfg, k)} (the folder says {v})" for k, v in found.items()
             if k in (explicit or set()) and getattr(cfg, k) != v]
    if clash:
        raise TowerError(f"the model config contradicts the vision tower at {cfg.vision_path}: "
                         + "; ".join(clash) + ". These come from the folder: remove them from "
                         "the model config (or set them to the folder's values)")
    check_fit(facts, cfg.image_size, cfg.vision_resize, cfg.vision_path)
    return dataclasses.replace(cfg, **found)


@contextlib.contextmanager
def _quiet_transformers():
    """A whole SigLIP/CLIP folder loads its text half as 'unexpected' keys: expected here, and
    missing keys are checked separately, so the long load report is kept off the console."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load(folder: str | Path, weights: bool = True) -> tuple[Any, TowerFacts]:
    """The tower module (fp32) and its facts; with weights=False only its architecture (the
    weights then come from a run's checkpoint)."""
    import torch
    from transformers import (
        AutoConfig,
        AutoModel,
        CLIPVisionConfig,
        CLIPVisionModel,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    folder = Path(folder)
    facts = inspect(folder)
    with _quiet_transformers():
        if facts.kind == "remote":
            config = AutoConfig.from_pretrained(folder, trust_remote_code=True, local_files_only=True)
            cls = AutoModel
        else:
            config_cls, cls = ((SiglipVisionConfig, SiglipVisionModel) if facts.kind == "siglip"
                               else (CLIPVisionConfig, CLIPVisionModel))
            config = config_cls.from_pretrained(folder, local_files_only=True)
            if facts.kind == "siglip":
                config.vision_use_head = False  # the pooling head is unused: tokens, not a vector
        if not weights:
            kw = {"trust_remote_code": True} if facts.kind == "remote" else {}
            tower = (AutoModel.from_config(config, **kw) if facts.kind == "remote"
                     else cls(config))
            return tower.float(), facts
        kw = {"trust_remote_code": True} if facts.kind == "remote" else {}
        tower, info = cls.from_pretrained(folder, config=config, local_files_only=True,
                                          dtype=torch.float32, output_loading_info=True, **kw)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise TowerError(f"the weights in {folder} do not fit its config: {len(missing)} missing "
                         f"tensors ({missing[:4]}); is the folder complete?")
    log.info("vision tower: %s (%s) from %s, %d px, patch %d, width %d; normalisation from %s",
             type(tower).__name__, facts.kind, folder, facts.image_size, facts.patch_size,
             facts.hidden, facts.norm_from)
    return tower.float(), facts


def copy_config(src: str | Path, dst: str | Path) -> None:
    """Keep a tower's config files and code (not its weights) in a run folder."""
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        return
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in [*(src / n for n in CONFIG_FILES), *src.glob("*.py")]:
        if f.is_file():
            shutil.copy2(f, tmp / f.name)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
