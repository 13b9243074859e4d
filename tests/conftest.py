"""Shared helpers: tiny real media and small corpora generated in code."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml
from PIL import Image

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def write_image(path: Path, size: tuple[int, int] = (64, 48), seed: int = 0, fmt: str = "JPEG") -> Path:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)
    return path


def write_flac(path: Path, seconds: float = 1.0, sr: int = 16000, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    wave = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.01 * rng.standard_normal(t.size)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, wave.astype(np.float32), sr)
    return path


def caption(i: int, image: str | None) -> dict:
    rec = {"id": f"c{i:05d}", "conversations": [
        {"from": "human", "value": ("<image>\n" if image else "") + "Describe the image."},
        {"from": "gpt", "value": f"Picture number {i}."}]}
    if image:
        rec["image"] = image
    return rec


def make_caption_corpus(root: Path, n: int, max_samples: int = 5, bad_every: int = 0) -> Path:
    """n caption records over real JPEGs; every `bad_every`-th points at a missing file."""
    recs = []
    for i in range(n):
        if bad_every and i % bad_every == bad_every - 1:
            recs.append(caption(i, f"img/missing_{i}.jpg"))
        else:
            write_image(root / "media" / "img" / f"{i}.jpg", (40 + i % 7, 30 + i % 5), seed=i)
            recs.append(caption(i, f"img/{i}.jpg"))
    (root / "cap.json").write_text(json.dumps(recs, indent=1))
    cfg = {"name": "t", "shard": {"max_samples": max_samples},
           "sources": [{"name": "cap", "kind": "caption", "format": "llava",
                        "path": "cap.json", "media_root": "media"}]}
    path = root / "corpus.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def ray_executor(tmp_path_factory):
    """One local Ray for the session (2 CPUs), its state in a short temp dir."""
    import tempfile

    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    os.environ["RAY_TMPDIR"] = tmp
    from flows.ray_exec import RayDataExecutor

    ex = RayDataExecutor(num_cpus=2, window=64)
    yield ex
    import ray

    ray.shutdown()


@pytest.fixture
def caption_corpus(tmp_path: Path) -> Path:
    return make_caption_corpus(tmp_path / "in", 23, max_samples=5, bad_every=7)
