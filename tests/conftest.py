"""Shared helpers: tiny real media and small corpora generated in code."""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml
from PIL import Image

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

REPO = Path(__file__).resolve().parent.parent
CLI = str(Path(sys.executable).parent / "vita-corpus")


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


def make_caption_corpus(root: Path, n: int, max_samples: int = 5, bad_every: int = 0,
                        image_size: tuple[int, int] | None = None, name: str = "cap") -> Path:
    """n caption records over real JPEGs; every `bad_every`-th points at a missing file.
    `image_size` gives every image that size (slower to tile) instead of tiny varied ones."""
    recs = []
    for i in range(n):
        if bad_every and i % bad_every == bad_every - 1:
            recs.append(caption(i, f"img/missing_{i}.jpg"))
        else:
            size = image_size or (40 + i % 7, 30 + i % 5)
            write_image(root / "media" / "img" / f"{i}.jpg", size, seed=i)
            recs.append(caption(i, f"img/{i}.jpg"))
    (root / f"{name}.json").write_text(json.dumps(recs, indent=1))
    cfg = {"name": "t", "shard": {"max_samples": max_samples},
           "sources": [{"name": name, "kind": "caption", "format": "llava",
                        "path": f"{name}.json", "media_root": "media"}]}
    path = root / "corpus.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def add_source(cfg_path: Path, name: str, copy_of: str) -> Path:
    """Add source `name` to a config: the records of source `copy_of` under new ids."""
    cfg = yaml.safe_load(cfg_path.read_text())
    src = next(s for s in cfg["sources"] if s["name"] == copy_of)
    recs = json.loads((cfg_path.parent / src["path"]).read_text())
    for r in recs:
        r["id"] = f"{name}_{r['id']}"
    (cfg_path.parent / f"{name}.json").write_text(json.dumps(recs, indent=1))
    cfg["sources"].append({**src, "name": name, "path": f"{name}.json"})
    cfg_path.write_text(yaml.safe_dump(cfg))
    return cfg_path


def env_for(tmp: Path, **extra: str) -> dict[str, str]:
    """The environment of a `vita-corpus` subprocess: Prefect and Ray state under temp dirs."""
    env = dict(os.environ, PREFECT_HOME=str(tmp / "prefect"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false",
               RAY_TMPDIR=tempfile.mkdtemp(prefix="ray", dir="/tmp"), **extra)
    env.pop("PREFECT_API_URL", None)
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


def tars(out: Path, stage: str = "ingest") -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / stage).glob("*.tar"))}


def tar_keys(out: Path, stage: str = "ingest") -> list[str]:
    """Every sample key in a stage's tars, in shard order, repeats kept."""
    import tarfile

    keys = []
    for p in sorted((out / stage).glob("*.tar")):
        with tarfile.open(p) as tf:
            keys += [m.name.split(".", 1)[0] for m in tf.getmembers() if m.name.endswith(".json")]
    return keys


def temp_leftovers(out: Path) -> list[str]:
    """Files under OUT still carrying a temporary name (storage.uri.TMP_MARK)."""
    from storage.uri import TMP_MARK

    return sorted(str(p.relative_to(out)) for p in out.rglob(f"*{TMP_MARK}*"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_executor(tmp_path_factory):
    """One local Ray for the session (2 CPUs), its state in a short temp dir."""
    import tempfile

    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    os.environ["RAY_TMPDIR"] = tmp
    from flows.build.ray_exec import RayDataExecutor

    ex = RayDataExecutor(num_cpus=2, window=64)
    yield ex
    import ray

    ray.shutdown()


@pytest.fixture
def caption_corpus(tmp_path: Path) -> Path:
    return make_caption_corpus(tmp_path / "in", 23, max_samples=5, bad_every=7)


def ffmpeg(*args: str) -> None:
    import subprocess

    import imageio_ffmpeg

    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-hide_banner", "-loglevel", "error",
                    *args], check=True, capture_output=True)


def clip(path: Path, seconds: float, size: str = "320x240", fps: int = 25, gop: int | None = None,
         faststart: bool = True) -> Path:
    """An H.264 mp4 of ffmpeg's test pattern (its frame counter shows the time)."""
    args = ["-f", "lavfi", "-i", f"testsrc=duration={seconds}:size={size}:rate={fps}",
            "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]
    if gop:
        args += ["-g", str(gop)]
    if faststart:
        args += ["-movflags", "+faststart"]
    ffmpeg(*args, str(path))
    return path


@pytest.fixture(scope="session")
def clips(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("clips")
    out = {
        "2s": clip(d / "2s.mp4", 2),
        "10s": clip(d / "10s.mp4", 10, gop=25),
        "60s_720p": clip(d / "60s.mp4", 60, size="1280x720", gop=250),
        "moov_last": clip(d / "moov_last.mp4", 6, faststart=False),
    }
    # Variable frame rate: 2 s at 10 fps then 3 s at 30 fps, timestamps kept as they are.
    ffmpeg("-f", "lavfi", "-i", "testsrc=duration=2:size=320x240:rate=10",
           "-f", "lavfi", "-i", "testsrc=duration=3:size=320x240:rate=30",
           "-filter_complex", "[0:v][1:v]concat=n=2:v=1[v]", "-map", "[v]",
           "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-fps_mode", "vfr",
           str(d / "vfr.mp4"))
    out["vfr"] = d / "vfr.mp4"
    ffmpeg("-display_rotation", "90", "-i", str(out["10s"]), "-c", "copy", str(d / "rot.mp4"))
    out["rotated"] = d / "rot.mp4"
    ffmpeg("-f", "lavfi", "-i", "sine=duration=3", "-c:a", "aac", str(d / "audio.m4a"))
    out["audio_only"] = d / "audio.m4a"
    return out


def screenshot(page: Path, png: Path, size: tuple[int, int]) -> Path:
    """Render a local HTML page in Debian's headless Chromium (as `make test` installs it)."""
    import shutil
    import subprocess

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is needed: make test installs it (apt-get install chromium)"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={png.parent / (png.stem + '-profile')}",
                    f"--window-size={size[0]},{size[1]}", f"--screenshot={png}",
                    page.resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    return png
