"""Model and run configuration: dataclasses with a comment on each field, saved with every checkpoint.

`ModelConfig()` is the tiny default that trains on a CPU in seconds; `ModelConfig.paper()` holds
the shapes of VITA-1.5 (InternViT-300M, Qwen2-7B, a 24-layer audio encoder, TiCodec, 4-layer
NAR/AR decoders) for users with the hardware. Any field can be set from a YAML file
(`--model-config`); `llm_path` points at a local Qwen2 folder (weights and tokenizer) and
`vision_path` at a local SigLIP, CLIP or InternViT-style vision folder (training.towers).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class TrainConfigError(ValueError):
    """A model or run setting that cannot work; the message names the field and the fix."""


@dataclass
class ModelConfig:
    # vision: a ViT over 448 px tiles; tokens per tile = (image_size / patch_size / 2) ** 2 after
    # the 2x2 pixel shuffle (256 at the paper's patch 14, 16 at the tiny default's patch 56)
    image_size: int = 448
    patch_size: int = 56
    vision_hidden: int = 32
    vision_layers: int = 1
    vision_heads: int = 2
    # a pretrained tower instead of the built-in ViT: a local SigLIP/CLIP/InternViT-style folder
    # (training.towers); its patch size, widths, input size and normalisation fill the vision
    # settings here, and a model YAML that contradicts them is refused
    vision_path: str | None = None
    vision_resize: bool = False  # resize tiles to a tower made for another size (else refused)
    vision_image_size: int | None = None  # the tower's input size (None: image_size, the tiles')
    image_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # InternViT's
    image_std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    # LLM: Qwen2 architecture (transformers' Qwen2ForCausalLM)
    llm_hidden: int = 64
    llm_layers: int = 2
    llm_heads: int = 4
    llm_kv_heads: int = 2
    llm_intermediate: int = 128
    llm_max_positions: int = 4096
    llm_path: str | None = None  # a local Qwen2 folder (config, weights, tokenizer); never downloaded
    tokenizer_path: str | None = None  # a local tokenizer folder/file; else BPE trained on the stage
    bpe_vocab_size: int = 1000  # size of the byte-level BPE trained when no tokenizer is given
    # audio encoder: 80-bin fbank at 16 kHz (25 ms window, 10 ms hop), 4x conv downsampling
    n_mels: int = 80
    audio_hidden: int = 64
    audio_layers: int = 2
    audio_heads: int = 4
    # speech decoders (LLaMA layers) and the codec
    decoder_hidden: int = 64
    nar_layers: int = 1
    ar_layers: int = 1
    decoder_heads: int = 4
    codec_codebook: int = 1024  # a single codebook, as the paper's TiCodec
    codec_dim: int = 32
    codec_channels: int = 32
    codec_strides: list[int] = field(default_factory=lambda: [2, 4, 5, 3, 5])  # 24 kHz -> 40 Hz
    codec_sample_rate: int = 24000

    def __post_init__(self) -> None:
        size = self.tower_size
        if size % self.patch_size or (size // self.patch_size) % 2:
            raise TrainConfigError(
                f"image_size {size} / patch_size {self.patch_size} must be an even "
                "whole number (the 2x2 pixel shuffle); e.g. patch_size 14, 28 or 56 at 448 px")
        for name, hidden, heads in (("vision", self.vision_hidden, self.vision_heads),
                                    ("llm", self.llm_hidden, self.llm_heads),
                                    ("audio", self.audio_hidden, self.audio_heads),
                                    ("decoder", self.decoder_hidden, self.decoder_heads)):
            if hidden % heads:
                raise TrainConfigError(f"{name}_hidden {hidden} must be divisible by "
                                       f"{name}_heads {heads}")
        if any(s < 2 for s in self.codec_strides):
            raise TrainConfigError(f"codec_strides {self.codec_strides}: each stride must be >= 2")
        if self.llm_heads % self.llm_kv_heads:
            raise TrainConfigError(f"llm_heads {self.llm_heads} must be a multiple of "
                                   f"llm_kv_heads {self.llm_kv_heads}")

    @property
    def tower_size(self) -> int:
        """The vision encoder's input size: the tiles' size unless a tower resizes them."""
        return self.vision_image_size or self.image_size

    @property
    def tokens_per_tile(self) -> int:
        return (self.tower_size // self.patch_size // 2) ** 2

    @property
    def codec_hop(self) -> int:
        return math.prod(self.codec_strides)

    @classmethod
    def paper(cls) -> ModelConfig:
        """VITA-1.5's shapes (random weights unless llm_path is set): a multi-GPU model."""
        return cls(patch_size=14, vision_hidden=1024, vision_layers=24, vision_heads=16,
                   llm_hidden=3584, llm_layers=28, llm_heads=28, llm_kv_heads=4,
                   llm_intermediate=18944, llm_max_positions=32768, bpe_vocab_size=32000,
                   audio_hidden=1024, audio_layers=24, audio_heads=16, decoder_hidden=896,
                   nar_layers=4, ar_layers=4, decoder_heads=14, codec_dim=512,
                   codec_channels=512)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TrainConfigError(f"unknown model setting(s) {unknown}; known: {sorted(known)}")
        base = cls.paper() if d.get("preset") == "paper" else cls()
        return dataclasses.replace(base, **{k: v for k, v in d.items() if k != "preset"})

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        d = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(d, dict):
            raise TrainConfigError(f"{path}: expected a mapping of model settings")
        preset = d.pop("preset", None)
        if preset not in (None, "tiny", "paper"):
            raise TrainConfigError(f"{path}: preset must be tiny or paper, got {preset!r}")
        cfg = cls.from_dict({**d, **({"preset": preset} if preset else {})})
        if cfg.vision_path:
            from training.towers import TowerError, resolve

            try:
                cfg = resolve(cfg, explicit=set(d))
            except TowerError as err:
                raise TrainConfigError(f"{path}: {err}") from None
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RunConfig:
    stage: str  # the sub-stage: 1.1, 1.2, 1.3, 2.1a, 2.1b, 2.2, 3.1, 3.2
    steps: int = 100  # optimizer steps to run (in total, counting resumed ones)
    batch_size: int = 4  # samples per micro-batch on each process (with pack: rows of max_len)
    max_len: int = 4096  # longest token sequence: text after the last medium may be cut, never media
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    seed: int = 0  # shard order, shuffle buffer and initial weights
    shuffle_buffer: int = 64  # samples held for shuffling (and length bucketing)
    num_workers: int | None = None  # DataLoader workers decoding media (None: 0 on a CPU, a few on a GPU)
    save_every: int = 0  # checkpoint every N steps (0: only at the end)
    log_every: int = 1
    device: str = "auto"  # auto | cpu | cuda
    state_loss_weight: float = 1.0  # stage 2.2: weight of the spoken/typed state-head loss
    # micro-batches per step on each process, their gradients summed (None: 1, or on a resume
    # what keeps the run's data-parallel width, processes x grad_accum, unchanged)
    grad_accum: int | None = None
    pack: bool = False  # pack several samples into each row of up to max_len tokens (chat stages)
    fsdp: bool = False  # shard parameters, gradients and optimizer state (FSDP2) per block
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    # device memory per process that the sharding decision plans for (None: a GPU's total
    # memory; on a CPU unknown, so nothing is sharded unless fsdp)
    memory_gb: float | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_len", "shuffle_buffer"):
            if getattr(self, name) < 1:
                raise TrainConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.grad_accum is not None and self.grad_accum < 1:
            raise TrainConfigError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.memory_gb is not None and not self.memory_gb > 0:
            raise TrainConfigError(f"memory_gb must be > 0, got {self.memory_gb}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise TrainConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
