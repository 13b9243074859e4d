import io

import numpy as np
import pytest
from PIL import Image

from schemas.params import TilingConfig
from schemas.rejects import Rejected
from transforms.tiling import (
    fast_tiles,
    n_tiles,
    open_image,
    psnr,
    reference_tiles,
    tile_grid,
    tile_image,
)

# (width, height) -> (cols, rows); the first eight are the ones the design and issue name.
WORKED = [
    ((448, 448), (1, 1)), ((634, 634), (2, 2)), ((633, 633), (1, 1)), ((640, 480), (4, 3)),
    ((1920, 1080), (4, 2)), ((1000, 500), (2, 1)), ((300, 1000), (1, 3)), ((700, 600), (4, 3)),
    ((1, 1), (1, 1)), ((3, 2000), (1, 12)), ((2000, 3), (12, 1)), ((1080, 1920), (2, 4)),
    ((800, 600), (4, 3)), ((1024, 768), (4, 3)), ((1280, 720), (4, 2)), ((4000, 3000), (4, 3)),
    ((3000, 4000), (3, 4)), ((500, 500), (1, 1)), ((896, 448), (2, 1)), ((448, 896), (1, 2)),
    ((1344, 448), (3, 1)), ((2048, 1024), (4, 2)), ((600, 400), (3, 2)), ((400, 600), (2, 3)),
    ((1200, 300), (4, 1)), ((300, 1200), (1, 4)), ((5000, 500), (10, 1)), ((500, 5000), (1, 10)),
    ((897, 448), (2, 1)), ((1000, 1000), (3, 3)), ((1500, 1000), (3, 2)), ((224, 224), (1, 1)),
    ((10000, 10), (12, 1)), ((640, 640), (2, 2)), ((672, 448), (3, 2)),
]


@pytest.mark.parametrize("size,grid", WORKED)
def test_tile_grid_worked_examples(size, grid):
    assert tile_grid(*size) == grid


def _internvl_oracle(width, height, min_num=1, max_num=12, image_size=448):
    """InternVL's dynamic_preprocess grid choice, transcribed as published."""
    aspect_ratio = width / height
    target_ratios = set(
        (i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num)
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def test_tile_grid_matches_internvl_on_random_sizes():
    rng = np.random.default_rng(7)
    sizes = rng.integers(1, 6000, size=(3000, 2))
    for w, h in sizes:
        assert tile_grid(int(w), int(h)) == _internvl_oracle(int(w), int(h)), (w, h)
    for max_num in (1, 6, 24):
        for w, h in sizes[:300]:
            assert tile_grid(int(w), int(h), 1, max_num) == _internvl_oracle(int(w), int(h), 1, max_num)


def test_thumbnail_rule():
    assert n_tiles((1, 1)) == 1 and n_tiles((2, 1)) == 3 and n_tiles((4, 3)) == 13
    assert n_tiles((4, 3), thumbnail=False) == 12


def photo(w, h, seed=0, fmt="JPEG", mode="RGB", **save):
    """A photo-like image: smooth shapes, edges and mild sensor noise."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (max(1, h // 24), max(1, w // 24), 3), dtype=np.uint8)
    im = Image.fromarray(base).resize((w, h), Image.BICUBIC)
    arr = np.asarray(im).astype(np.int16) + rng.integers(-6, 7, (h, w, 3))
    im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if mode != "RGB":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}), **save)
    return buf.getvalue()


@pytest.mark.parametrize("w,h,fmt", [(1920, 1080, "JPEG"), (4000, 3000, "JPEG"), (640, 480, "JPEG"),
                                     (3000, 800, "PNG"), (700, 600, "JPEG"), (3, 2000, "PNG"),
                                     (1, 1, "PNG"), (5000, 500, "JPEG")])
def test_fast_tiles_match_the_pil_reference(w, h, fmt):
    data = photo(w, h, fmt=fmt)
    ref = reference_tiles(data)
    grid, size, fast = fast_tiles(data)
    assert size == (w, h) and grid == tile_grid(w, h)
    assert len(fast) == len(ref) == n_tiles(grid)
    for a, b in zip(ref, fast, strict=True):
        assert a.size == b.size == (448, 448)
        assert psnr(a, b) >= 40.0


def test_tile_image_encodes_448_jpegs_with_thumbnail_last():
    data = photo(1000, 500)
    t = tile_image(data, TilingConfig(jpeg_quality=80))
    assert t.grid == (2, 1) and len(t.tiles) == 3 and t.tokens == 3 * 256
    ims = [Image.open(io.BytesIO(b)) for b in t.tiles]
    assert all(im.format == "JPEG" and im.size == (448, 448) for im in ims)
    # The thumbnail is the whole picture: it resembles the image squeezed to 448x448.
    whole = Image.open(io.BytesIO(data)).convert("RGB").resize((448, 448), Image.BICUBIC)
    assert psnr(ims[-1].convert("RGB"), whole) > 30
    assert t.meta()["thumbnail"] is True
    assert TilingConfig(thumbnail=False) and len(tile_image(data, TilingConfig(thumbnail=False)).tiles) == 2


def test_exif_orientation_is_applied_before_the_grid():
    im = Image.open(io.BytesIO(photo(1000, 500)))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif.tobytes())
    t = tile_image(buf.getvalue())
    assert t.source_size == (500, 1000) and t.grid == (1, 2)


@pytest.mark.parametrize("mode", ["P", "RGBA", "LA", "L", "CMYK", "1", "I;16"])
def test_modes_convert_to_rgb(mode):
    if mode == "I;16":
        arr = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
        im = Image.fromarray(arr)
        buf = io.BytesIO()
        im.save(buf, "PNG")
        out = open_image(buf.getvalue(), 10**8)
        got = np.asarray(out)
        assert out.mode == "RGB" and got.max() == 255 and got.min() == 0  # scaled, not clipped
        return
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    data = photo(64, 48, fmt=fmt, mode=mode)
    out = open_image(data, 10**8)
    assert out.mode == "RGB" and out.size == (64, 48)


def test_transparent_pixels_become_white():
    im = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    assert np.asarray(open_image(buf.getvalue(), 10**8))[0, 0].tolist() == [255, 255, 255]


def test_bad_images_reject_with_reasons():
    data = photo(800, 600)
    with pytest.raises(Rejected) as e:
        tile_image(data[: len(data) // 3])
    assert e.value.reason == "image_decode_error"
    with pytest.raises(Rejected) as e:
        tile_image(b"not an image at all")
    assert e.value.reason == "image_decode_error"
    with pytest.raises(Rejected) as e:
        tile_image(photo(800, 600), max_pixels=1000)
    assert e.value.reason == "image_too_large"


def test_config_refuses_bad_values_naming_them():
    with pytest.raises(ValueError, match="min_num <= max_num"):
        TilingConfig(min_num=5, max_num=2)
    with pytest.raises(ValueError, match="jpeg_quality"):
        TilingConfig(jpeg_quality=0)
