"""InternVL dynamic tiling, as VITA-1.5 uses it: an exact grid, fast pixels.

The grid choice (`tile_grid`) reproduces InternVL's `dynamic_preprocess` step for step,
including its candidate order (a set of (cols, rows) sorted by area) and the area tie-break,
because a model trained on our shards is evaluated with InternVL's own preprocessing.

The pixels come from a faster path than InternVL's loader, and must stay within 40 dB PSNR of
that reference (`reference_tiles`, plain PIL bicubic):
- a JPEG much larger than the grid is decoded at 1/2, 1/4 or 1/8 scale by libjpeg's DCT
  scaling (`draft`), never below the grid's size;
- the resize is torch's antialiased bicubic on uint8 channels-last tensors, which follows
  PIL's bicubic filter to within rounding at several times its speed (PIL is the fallback);
- the thumbnail is made from the already-resized grid image instead of the original.
"""

from __future__ import annotations

import functools
import io
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from schemas.params import TilingConfig
from transforms.media import load_pixels, open_header

IMAGE_SIZE = 448
TOKENS_PER_TILE = 256
MAX_PIXELS = 100_000_000

try:  # torch is a dependency; keep tiling usable without it, on the slower PIL path
    import torch
    import torch.nn.functional as F

    _HAVE_TORCH = True
except ImportError:  # pragma: no cover - exercised only where torch is absent
    _HAVE_TORCH = False

try:  # OpenCV decodes JPEG straight into an array (PIL would need a repacking copy)
    import cv2

    cv2.setNumThreads(1)
    _HAVE_CV2 = True
except ImportError:  # pragma: no cover
    _HAVE_CV2 = False


@functools.cache
def target_ratios(min_num: int = 1, max_num: int = 12) -> tuple[tuple[int, int], ...]:
    """InternVL's candidate grids, in InternVL's order (a set sorted by cols*rows)."""
    ratios = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    )
    return tuple(sorted(ratios, key=lambda x: x[0] * x[1]))


def tile_grid(width: int, height: int, min_num: int = 1, max_num: int = 12,
              image_size: int = IMAGE_SIZE) -> tuple[int, int]:
    """(cols, rows) exactly as InternVL's `find_closest_aspect_ratio` chooses them."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    aspect = width / height
    best_diff = float("inf")
    best = (1, 1)
    area = width * height
    for ratio in target_ratios(min_num, max_num):
        diff = abs(aspect - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff = diff
            best = ratio
        elif diff == best_diff and area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best = ratio
    return best


def n_tiles(grid: tuple[int, int], thumbnail: bool = True) -> int:
    n = grid[0] * grid[1]
    return n + 1 if thumbnail and n > 1 else n


_GREY = ("L", "I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def to_rgb(im: Image.Image, grey: bool = False) -> Image.Image:
    """RGB for any PIL mode: alpha composited on white, 16-bit scaled, palette expanded. With
    `grey`, a grey image stays one 8-bit channel (a third of the memory; its RGB would be three
    equal channels)."""
    if im.mode == "RGB" or (grey and im.mode == "L"):
        return im
    if grey and im.mode in _GREY[1:]:
        return _grey8(im)
    if im.mode in _GREY[1:]:
        return _grey8(im).convert("RGB")
    return _colour(im)


def _grey8(im: Image.Image) -> Image.Image:
    """An 8-bit grey image from a 16-bit, 32-bit or float one."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        lo, hi = im.getextrema()
        peak = 65535 if hi > 255 or im.mode.startswith("I;16") else 255
        # round(v * 255 / peak) in integers, a block of rows at a time: a float64 copy of a
        # 100 MP image, and its temporaries, took 3 GB.
        return _to_l8(im, lambda b: (np.clip(b, 0, None).astype(np.int64) * 510 + peak)
                      // (2 * peak))
    lo, hi = im.getextrema()  # "F"
    lo, hi = min(float(lo), 0.0), max(float(hi), 1.0)
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return _to_l8(im, lambda b: (b.astype(np.float64) - lo) * scale + 0.5)


def _colour(im: Image.Image) -> Image.Image:
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")


def _to_l8(im: Image.Image, scale: Any, rows: int = 512) -> Image.Image:
    """An 8-bit grey image from a wide one, `scale` applied to blocks of `rows` rows (no
    copy of the whole wide image is made)."""
    w, h = im.size
    out = np.empty((h, w), dtype=np.uint8)
    for r in range(0, h, rows):
        block = np.asarray(im.crop((0, r, w, min(h, r + rows))))
        out[r:r + rows] = np.clip(scale(block), 0, 255).astype(np.uint8)
    return Image.fromarray(out)


def open_image(data: bytes, max_pixels: int, draft_to: tuple[int, int] | None = None,
               max_decoded: int | None = None, grey: bool = False) -> Image.Image:
    """Decode to an upright RGB image (8-bit grey for a grey one, with `grey`); with
    `draft_to`, JPEGs may decode at a reduced scale."""
    im = open_header(data, max_pixels, max_decoded)
    orientation = _orientation(im)
    if draft_to is not None and orientation in (5, 6, 7, 8):
        draft_to = (draft_to[1], draft_to[0])  # the draft is in stored axes, before rotation
    im = load_pixels(im, draft_to)
    if orientation != 1:
        im = ImageOps.exif_transpose(im)
    return to_rgb(im, grey)


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block: orientation unknown, keep the stored axes
        return 1


def upright_size(im: Image.Image) -> tuple[int, int]:
    """An opened image's size after EXIF orientation, from the header alone."""
    w, h = im.size
    return (h, w) if _orientation(im) in (5, 6, 7, 8) else (w, h)


def _resize(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    return im if im.size == size else im.resize(size, Image.BICUBIC)


def _resize_t(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased bicubic on a (1, 3, H, W) uint8 channels-last tensor; size is (W, H)."""
    if (x.shape[3], x.shape[2]) == size:
        return x
    return F.interpolate(x, size=(size[1], size[0]), mode="bicubic", antialias=True,
                         align_corners=False)


def _cut(resized: Image.Image, grid: tuple[int, int], s: int) -> list[Image.Image]:
    cols, rows = grid
    return [resized.crop((c * s, r * s, (c + 1) * s, (r + 1) * s))
            for r in range(rows) for c in range(cols)]


def reference_tiles(data: bytes, cfg: TilingConfig = TilingConfig(),
                    max_pixels: int = MAX_PIXELS, max_decoded: int | None = None
                    ) -> list[Image.Image]:
    """InternVL's loader with plain PIL: decode, RGB, bicubic resize, cut, thumbnail."""
    im = open_image(data, max_pixels, max_decoded=max_decoded)
    grid = tile_grid(*im.size, cfg.min_num, cfg.max_num, cfg.image_size)
    s = cfg.image_size
    tiles = _cut(_resize(im, (grid[0] * s, grid[1] * s)), grid, s)
    if cfg.thumbnail and len(tiles) > 1:
        tiles.append(_resize(im, (s, s)))
    return tiles


@dataclass
class Tiled:
    grid: tuple[int, int]
    source_size: tuple[int, int]
    tiles: list[bytes] = field(repr=False)

    @property
    def tokens(self) -> int:
        return len(self.tiles) * TOKENS_PER_TILE

    def meta(self) -> dict[str, Any]:
        return {"grid": list(self.grid), "tiles": len(self.tiles),
                "source_size": list(self.source_size), "thumbnail": len(self.tiles) > 1}


def _jpeg_complete(data: bytes) -> bool:
    """An end-of-image marker after the last start-of-scan: the entropy-coded data is whole.

    0xFF inside entropy-coded data is always stuffed (FF 00) or a restart marker (FF D0-D7),
    so FF D9 / FF DA found by a byte search are the real markers.
    """
    return data.rfind(b"\xff\xd9") > data.rfind(b"\xff\xda") > 0


def _cv2_decode(data: bytes, size: tuple[int, int], target: tuple[int, int]) -> np.ndarray | None:
    """BGR pixels of a complete JPEG (EXIF orientation applied), reduced by DCT scaling where
    the grid allows; None when cv2 cannot give exactly what PIL would."""
    if not (_HAVE_CV2 and _jpeg_complete(data)):
        return None
    w, h = size
    flag = cv2.IMREAD_COLOR
    for k, reduced in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                       (2, cv2.IMREAD_REDUCED_COLOR_2)):
        if w // k >= target[0] and h // k >= target[1]:
            flag = reduced
            break
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    if arr is None or arr.ndim != 3 or arr.shape[2] != 3:
        return None
    if flag == cv2.IMREAD_COLOR and (arr.shape[1], arr.shape[0]) != (w, h):
        return None  # orientation handled differently: let PIL decide
    return arr


def _planes(y: torch.Tensor, grid: tuple[int, int], s: int) -> list[list[np.ndarray]]:
    """Cut a (1, 3, H, W) planar tensor into tiles, each a list of three (s, s) planes."""
    p = y[0].numpy()
    chans = [0, 0, 0] if p.shape[0] == 1 else [0, 1, 2]  # grey: one plane, three times
    return [[p[ch, r * s:(r + 1) * s, c * s:(c + 1) * s] for ch in chans]
            for r in range(grid[1]) for c in range(grid[0])]


def _fast_planes(data: bytes, cfg: TilingConfig, max_pixels: int, max_decoded: int | None):
    """(grid, upright size, tiles as planes, channel order 'RGB'|'BGR'), or (grid, size, PIL
    tiles, None) on the plain PIL path."""
    head = open_header(data, max_pixels, max_decoded)
    w, h = upright_size(head)
    grid = tile_grid(w, h, cfg.min_num, cfg.max_num, cfg.image_size)
    s = cfg.image_size
    target = (grid[0] * s, grid[1] * s)
    thumb = cfg.thumbnail and grid[0] * grid[1] > 1
    if not (cfg.fast and _HAVE_TORCH):
        im = open_image(data, max_pixels, max_decoded=max_decoded)
        tiles = _cut(_resize(im, target), grid, s)
        return grid, (w, h), tiles + ([_resize(im, (s, s))] if thumb else []), None
    arr, order = None, "RGB"
    if head.format == "JPEG" and head.mode in ("RGB", "L"):
        arr, order = _cv2_decode(data, (w, h), target), "BGR"
    if arr is None:
        arr, order = np.asarray(open_image(data, max_pixels, target, max_decoded, grey=True)), "RGB"
    # HWC uint8 memory is a channels-last NCHW tensor: no copy before the resize. A grey image
    # is resized as one channel and its tiles take it three times (the RGB of grey).
    with warnings.catch_warnings():  # PIL's arrays are read-only; torch only reads them here
        warnings.simplefilter("ignore", UserWarning)
        x = torch.from_numpy(arr)[None, None] if arr.ndim == 2 else \
            torch.from_numpy(arr).permute(2, 0, 1)[None]
    y = _resize_t(x, target)
    tiles = _planes(y, grid, s)
    if thumb:
        tiles += _planes(_resize_t(y, (s, s)), (1, 1), s)
    return grid, (w, h), tiles, order


def fast_tiles(data: bytes, cfg: TilingConfig = TilingConfig(), max_pixels: int = MAX_PIXELS,
               max_decoded: int | None = None
               ) -> tuple[tuple[int, int], tuple[int, int], list[Image.Image]]:
    """(grid, upright source size, RGB tile images) on the fast path."""
    grid, size, tiles, order = _fast_planes(data, cfg, max_pixels, max_decoded)
    if order is None:
        return grid, size, tiles
    idx = (2, 1, 0) if order == "BGR" else (0, 1, 2)
    return grid, size, [Image.merge("RGB", [Image.fromarray(np.ascontiguousarray(t[i]))
                                            for i in idx]) for t in tiles]


def encode_jpeg(im: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def tile_image(data: bytes, cfg: TilingConfig = TilingConfig(),
               max_pixels: int = MAX_PIXELS, max_decoded: int | None = None) -> Tiled:
    """Decode, tile and JPEG-encode one image; raises Rejected for unusable input (an image
    over `max_pixels`, or over `max_decoded` bytes decoded, before its pixels are)."""
    grid, size, tiles, order = _fast_planes(data, cfg, max_pixels, max_decoded)
    q = cfg.jpeg_quality
    if order is None or not _HAVE_CV2:
        if order is not None:
            idx = (2, 1, 0) if order == "BGR" else (0, 1, 2)
            tiles = [Image.merge("RGB", [Image.fromarray(np.ascontiguousarray(t[i])) for i in idx])
                     for t in tiles]
        return Tiled(grid, size, [encode_jpeg(t, q) for t in tiles])
    # cv2 interleaves and encodes with the same libjpeg-turbo settings as PIL (same bytes),
    # without PIL's per-tile image objects.
    idx = (0, 1, 2) if order == "BGR" else (2, 1, 0)
    params = [cv2.IMWRITE_JPEG_QUALITY, q]
    return Tiled(grid, size, [cv2.imencode(".jpg", cv2.merge([t[i] for i in idx]), params)[1]
                              .tobytes() for t in tiles])


def psnr(a: Image.Image, b: Image.Image) -> float:
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    mse = float(((x - y) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
