"""The parts of a VITA-style model other than the LLM: vision and audio encoders, adapters, codec.

Shapes follow the paper (see training.config.ModelConfig.paper); the defaults are tiny.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.config import ModelConfig
from training.template import FBANK_HOP, FBANK_WIN


def _mel_filters(n_mels: int, n_fft: int, sr: int) -> np.ndarray:
    def hz_to_mel(f: np.ndarray) -> np.ndarray:
        return 1127.0 * np.log1p(f / 700.0)

    mels = np.linspace(hz_to_mel(np.array(20.0)), hz_to_mel(np.array(sr / 2)), n_mels + 2)
    hz = 700.0 * np.expm1(mels / 1127.0)
    bins = np.fft.rfftfreq(n_fft, 1 / sr)
    fb = np.zeros((n_mels, len(bins)), dtype=np.float32)
    for m in range(n_mels):
        lo, mid, hi = hz[m], hz[m + 1], hz[m + 2]
        fb[m] = np.maximum(0, np.minimum((bins - lo) / (mid - lo), (hi - bins) / (hi - mid)))
    return fb


class Fbank(nn.Module):
    """80-bin log-mel filterbank at 16 kHz: 25 ms Hamming window, 10 ms hop (no padding, like
    Kaldi's), so a clip of n samples gives 1 + (n - 400) // 160 frames."""

    def __init__(self, n_mels: int = 80, sr: int = 16000, n_fft: int = 512) -> None:
        super().__init__()
        self.n_fft = n_fft
        self.register_buffer("window", torch.hamming_window(FBANK_WIN, periodic=False), persistent=False)
        self.register_buffer("mel", torch.from_numpy(_mel_filters(n_mels, n_fft, sr)), persistent=False)

    @torch.autocast("cuda", enabled=False)  # log-mel features in fp32, also under bf16 training
    def forward(self, wav: torch.Tensor) -> torch.Tensor:  # (B, n) -> (B, T, n_mels)
        if wav.shape[-1] < FBANK_WIN:
            wav = F.pad(wav, (0, FBANK_WIN - wav.shape[-1]))
        frames = wav.float().unfold(-1, FBANK_WIN, FBANK_HOP)  # (B, T, 400)
        frames = frames - frames.mean(-1, keepdim=True)
        spec = torch.fft.rfft(frames * self.window, n=self.n_fft).abs().pow(2)
        return torch.log(spec @ self.mel.T + 1e-6)


def _encoder(hidden: int, layers: int, heads: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(hidden, heads, 4 * hidden, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def _sinusoid(n: int, dim: int, device: torch.device) -> torch.Tensor:
    pos = torch.arange(n, device=device, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(1e4) / dim))
    pe = torch.zeros(n, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)[:, : dim // 2]
    return pe


def pixel_shuffle(x: torch.Tensor, grid: int) -> torch.Tensor:
    """(N, grid*grid, C) patch tokens -> (N, (grid/2)**2, 4C): each 2x2 block of patches is one token."""
    n, _, c = x.shape
    x = x.reshape(n, grid // 2, 2, grid // 2, 2, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (grid // 2) ** 2, 4 * c)


class VisionEncoder(nn.Module):
    """A ViT over 448 px tiles; a 2x2 pixel shuffle turns its patch grid into the tile's tokens."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.grid = cfg.image_size // cfg.patch_size
        self.patch = nn.Conv2d(3, cfg.vision_hidden, cfg.patch_size, cfg.patch_size)
        self.pos = nn.Parameter(torch.zeros(1, self.grid * self.grid, cfg.vision_hidden))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = _encoder(cfg.vision_hidden, cfg.vision_layers, cfg.vision_heads)
        self.norm = nn.LayerNorm(cfg.vision_hidden)
        self.register_buffer("mean", torch.tensor(cfg.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.image_std).view(1, 3, 1, 1), persistent=False)

    @property
    def out_dim(self) -> int:
        return 4 * self.norm.normalized_shape[0]

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        """(N, 3, 448, 448) uint8 -> (N, tokens_per_tile, 4 * vision_hidden)."""
        x = (tiles.to(self.mean.dtype) / 255.0 - self.mean) / self.std
        x = self.patch(x.to(self.patch.weight.dtype)).flatten(2).transpose(1, 2) + self.pos
        return pixel_shuffle(self.norm(self.blocks(x)), self.grid)


class TowerEncoder(nn.Module):
    """A pretrained transformers vision tower (training.towers) in VisionEncoder's place: tiles
    resized to the tower's size when it differs, normalised as the tower was trained, patch
    tokens (a CLS token dropped) folded by the same 2x2 pixel shuffle."""

    def __init__(self, cfg: ModelConfig, tower: nn.Module) -> None:
        super().__init__()
        self.tower = tower
        self.size = cfg.tower_size
        self.resize = cfg.tower_size != cfg.image_size
        self.grid = cfg.tower_size // cfg.patch_size
        self.hidden = cfg.vision_hidden
        self.register_buffer("mean", torch.tensor(cfg.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.image_std).view(1, 3, 1, 1), persistent=False)

    @property
    def out_dim(self) -> int:
        return 4 * self.hidden

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) uint8 -> (N, tokens_per_tile, 4 * hidden)."""
        x = tiles.to(self.mean.dtype) / 255.0
        if self.resize:
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", antialias=True,
                              align_corners=False).clamp(0, 1)
        h = self.tower(pixel_values=(x - self.mean) / self.std).last_hidden_state
        if h.shape[1] == self.grid * self.grid + 1:  # CLIP and InternViT put a CLS token first
            h = h[:, 1:]
        elif h.shape[1] != self.grid * self.grid:
            raise ValueError(f"the vision tower gave {h.shape[1]} tokens per tile, expected "
                             f"{self.grid}x{self.grid} patches (and maybe a CLS token)")
        return pixel_shuffle(h, self.grid)


class VisionAdapter(nn.Module):
    """InternVL's mlp1: LayerNorm, Linear, GELU, Linear (the paper's 2-layer MLP)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim), nn.GELU(),
                                 nn.Linear(out_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _down(c_in: int, c_out: int) -> nn.Conv1d:
    return nn.Conv1d(c_in, c_out, kernel_size=3, stride=2, padding=1)


class AudioEncoder(nn.Module):
    """fbank -> 4x conv downsampling (two stride-2 convs: 100 Hz -> 25 Hz) -> transformer."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fbank = Fbank(cfg.n_mels)
        self.conv = nn.Sequential(_down(cfg.n_mels, cfg.audio_hidden), nn.GELU(),
                                  _down(cfg.audio_hidden, cfg.audio_hidden), nn.GELU())
        self.blocks = _encoder(cfg.audio_hidden, cfg.audio_layers, cfg.audio_heads)
        self.norm = nn.LayerNorm(cfg.audio_hidden)

    def forward(self, wav: torch.Tensor, frames: torch.Tensor, fbank_frames: torch.Tensor) -> torch.Tensor:
        """wav (B, n) at 16 kHz, right-padded; frames (B,) valid 25 Hz outputs of each clip;
        fbank_frames (B,) its valid fbank frames (the normalisation ignores the padding, so a
        clip encodes the same alone or beside a longer one)."""
        feats = self.fbank(wav)
        valid = (torch.arange(feats.shape[1], device=feats.device)[None] < fbank_frames[:, None])
        valid = valid[..., None].to(feats.dtype)
        n = valid.sum(1, keepdim=True).clamp(min=1)
        mean = (feats * valid).sum(1, keepdim=True) / n
        std = (((feats - mean) ** 2 * valid).sum(1, keepdim=True) / n).sqrt()
        feats = (feats - mean) / (std + 1e-5) * valid
        x = self.conv(feats.transpose(1, 2).to(self.conv[0].weight.dtype)).transpose(1, 2)
        x = x + _sinusoid(x.shape[1], x.shape[2], x.device).to(x.dtype)
        pad = torch.arange(x.shape[1], device=x.device)[None] >= frames[:, None]
        return self.norm(self.blocks(x, src_key_padding_mask=pad))


class AudioAdapter(nn.Module):
    """A stride-2 conv (25 Hz -> 12.5 Hz) and a projection into the LLM's width."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.conv = _down(cfg.audio_hidden, cfg.audio_hidden)
        self.proj = nn.Linear(cfg.audio_hidden, cfg.llm_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.conv(x.transpose(1, 2)).transpose(1, 2)))


class Codec(nn.Module):
    """A single-codebook waveform codec (TiCodec's shape): strided conv encoder to 40 Hz at
    24 kHz, nearest-neighbour vector quantiser (straight-through), transposed-conv decoder."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        ch, strides = cfg.codec_channels, cfg.codec_strides
        enc: list[nn.Module] = [nn.Conv1d(1, ch, 7, padding=3)]
        for s in strides:
            enc += [nn.GELU(), nn.Conv1d(ch, ch, 2 * s, stride=s, padding=s // 2 + s % 2)]
        enc += [nn.GELU(), nn.Conv1d(ch, cfg.codec_dim, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        self.codebook = nn.Embedding(cfg.codec_codebook, cfg.codec_dim)
        nn.init.uniform_(self.codebook.weight, -1 / cfg.codec_codebook, 1 / cfg.codec_codebook)
        dec: list[nn.Module] = [nn.Conv1d(cfg.codec_dim, ch, 3, padding=1)]
        for s in reversed(strides):
            dec += [nn.GELU(), nn.ConvTranspose1d(ch, ch, 2 * s, stride=s, padding=s // 2 + s % 2,
                                                  output_padding=s % 2)]
        dec += [nn.GELU(), nn.Conv1d(ch, 1, 7, padding=3), nn.Tanh()]
        self.decoder = nn.Sequential(*dec)
        self.hop = cfg.codec_hop

    @torch.autocast("cuda", enabled=False)  # waveforms in fp32: bf16 would cap the codec's fidelity
    def encode(self, wav: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, n) -> latents (B, T, dim) and codes (B, T), T = ceil(n / hop)."""
        n = wav.shape[-1]
        t = math.ceil(n / self.hop)
        wav = F.pad(wav, (0, t * self.hop - n))
        z = self.encoder(wav[:, None].float())[..., :t].transpose(1, 2)
        dist = torch.cdist(z.reshape(-1, z.shape[-1]).float(), self.codebook.weight.float())
        return z, dist.argmin(-1).view(z.shape[0], t)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.codebook(codes).transpose(1, 2))[:, 0]

    @torch.autocast("cuda", enabled=False)
    def forward(self, wav: torch.Tensor) -> dict[str, torch.Tensor]:
        wav = wav.float()
        z, codes = self.encode(wav)
        q = self.codebook(codes)
        vq = F.mse_loss(q, z.detach()) + 0.25 * F.mse_loss(z, q.detach())
        q = z + (q - z).detach()
        recon = self.decoder(q.transpose(1, 2))[:, 0, : wav.shape[-1]]
        spec = 0.0
        for n_fft in (256, 1024):
            win = torch.hann_window(n_fft, device=wav.device)
            a = torch.stft(recon.float(), n_fft, n_fft // 4, window=win, return_complex=True).abs()
            b = torch.stft(wav.float(), n_fft, n_fft // 4, window=win, return_complex=True).abs()
            spec = spec + F.l1_loss(torch.log(a + 1e-5), torch.log(b + 1e-5))
        wave = F.l1_loss(recon.float(), wav.float())
        return {"loss": wave + spec + vq, "wave_l1": wave, "spec_l1": spec, "vq": vq, "codes": codes}
