import io
import os
import struct
import zlib

import pytest
from PIL import Image

from schemas.rejects import Rejected
from storage.media import fetcher, resolve
from transforms.media import check_audio, check_image, check_video_container

from conftest import write_flac, write_image


def reason(fn, *a):
    with pytest.raises(Rejected) as e:
        fn(*a)
    return e.value.reason


@pytest.mark.parametrize("rel", ["/etc/passwd", "../../etc/passwd", "a/../../x.jpg", "..",
                                 "C:\\x.jpg", "s3://bucket/x.jpg", "\\\\server\\x.jpg"])
def test_paths_outside_the_root_are_refused(tmp_path, rel):
    assert reason(resolve, str(tmp_path), rel) == "path_outside_root"


def test_symlink_out_of_the_root_is_refused(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "secret.jpg").write_bytes(b"x")
    os.symlink(tmp_path / "secret.jpg", tmp_path / "root" / "link.jpg")
    assert reason(resolve, str(tmp_path / "root"), "link.jpg") == "path_outside_root"
    assert resolve(str(tmp_path / "root"), "./sub/../a.jpg") == str(tmp_path / "root" / "a.jpg")


def test_fetch_missing_empty_and_folder(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "dir").mkdir()
    fetch = fetcher(str(tmp_path))
    assert reason(fetch, "nope.jpg") == "missing_media"
    assert reason(fetch, "empty.jpg") == "empty_file"
    assert reason(fetch, "dir") == "missing_media"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_good_images_pass(tmp_path, fmt):
    data = write_image(tmp_path / "a", (321, 123), fmt=fmt).read_bytes()
    info = check_image(data, 10**8)
    assert (info.width, info.height, info.format) == (321, 123, fmt)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_images_are_rejected(tmp_path, fmt):
    data = write_image(tmp_path / "a", (640, 480), fmt=fmt).read_bytes()
    assert reason(check_image, data[: len(data) // 2], 10**8) == "image_decode_error"


def test_zero_byte_and_garbage_images(tmp_path):
    assert reason(check_image, b"", 10**8) == "empty_file"
    assert reason(check_image, b"GIF89a-not-really" * 10, 10**8) == "image_decode_error"
    assert reason(check_image, os.urandom(2000), 10**8) == "image_decode_error"


def _png_header(w: int, h: int) -> bytes:
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("w,h,limit", [(100_000, 100_000, 10**8), (20_000, 10_000, 10**8),
                                       (3000, 3000, 10**6)])
def test_decompression_bombs_are_rejected_from_the_header(w, h, limit):
    assert reason(check_image, _png_header(w, h), limit) == "image_too_large"


def test_audio_checks(tmp_path):
    info = check_audio(write_flac(tmp_path / "a.flac", 1.5, 16000).read_bytes())
    assert info["sample_rate"] == 16000 and info["duration_s"] == 1.5
    assert reason(check_audio, b"") == "empty_file"
    assert reason(check_audio, b"fLaC" + os.urandom(300)) == "audio_decode_error"


def test_video_container_signature():
    assert check_video_container(b"\0\0\0\x20ftypisom" + b"\0" * 100) == "mp4"
    assert reason(check_video_container, b"") == "empty_file"
    assert reason(check_video_container, b"<html>not a video</html>") == "video_decode_error"


def test_check_image_reports_mode_for_palette_and_alpha(tmp_path):
    buf = io.BytesIO()
    Image.new("P", (10, 10)).save(buf, "PNG")
    assert check_image(buf.getvalue(), 10**8).mode == "P"
