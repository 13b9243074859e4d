"""Inputs made to hurt (issue 25), each made here in code: a FIFO, a device, a sparse giant, a
symlinked transcript, a lying FLAC header, a lying mp4 sample table, deep JSON, a huge element,
an input that raises, two builds into one OUT, a zero-byte Great Expectations file.

Each build checks the hostile input's reason and that every other input of the build is still
written or rejected (the accounting holds). Nothing here may hang: every test runs under an
alarm, and what could block or read without end (a FIFO, a device) is built in a child process
with a timeout and a memory cap.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml
from typer.testing import CliRunner

from flows.build.executors import LocalExecutor
from flows.build.pipeline import build
from flows.cli import app
from schemas.config import load_config
from schemas.params import FileLimits
from schemas.rejects import Rejected
from storage import lock as out_lock
from storage.guard import read_guarded
from storage.jsonstream import iter_json_array
from storage.readers import read_source

from conftest import caption, clip, env_for, write_flac, write_image

REPO = Path(__file__).resolve().parent.parent
GOOD = 4  # good records around each hostile one


@pytest.fixture(autouse=True)
def alarm():
    """A backstop: a test still running after 240 s fails instead of hanging the suite."""

    def fire(*_):
        raise TimeoutError("the test ran past its 240 s alarm: something blocks")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(240)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


# --- corpora ---------------------------------------------------------------------------------

def caption_corpus(root: Path, hostile: list[dict], limits: dict | None = None,
                   name: str = "cap") -> Path:
    """GOOD good caption records, then the hostile ones, then GOOD more; a config for them."""
    recs = []
    for i in range(GOOD):
        write_image(root / "media" / f"g{i}.jpg", (40 + i, 30), seed=i)
        recs.append(caption(i, f"g{i}.jpg"))
    recs += hostile
    for i in range(GOOD, 2 * GOOD):
        write_image(root / "media" / f"g{i}.jpg", (40 + i, 30), seed=i)
        recs.append(caption(i, f"g{i}.jpg"))
    (root / f"{name}.json").write_text(json.dumps(recs))
    return write_config(root, [{"name": name, "kind": "caption", "format": "llava",
                                "path": f"{name}.json", "media_root": "media"}], limits)


def write_config(root: Path, sources: list[dict], limits: dict | None = None) -> Path:
    cfg = {"name": "hostile", "shard": {"max_samples": 5}, "sources": sources}
    if limits:
        cfg["limits"] = limits
    path = root / "corpus.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_build(cfg_path: Path, out: Path) -> dict:
    return build(load_config(cfg_path), str(out), executor=LocalExecutor())


def rejects(out: Path) -> list[dict]:
    return [json.loads(line) for p in sorted((out / "rejects").glob("*.jsonl"))
            for line in p.read_text().splitlines()]


def written_ids(out: Path) -> set[str]:
    return {s["id"] for p in sorted((out / "ingest").glob("*.manifest.json"))
            for s in json.loads(p.read_text())["samples"]}


def assert_accounted(report: dict, out: Path, good: set[str], bad: dict[str, str]) -> None:
    """Every good id written, every hostile input rejected with its reason, nothing else."""
    assert report["accounted"] is True
    for s in report["sources"].values():
        assert s["inputs"] == s["written"] + s["rejected"]
    assert written_ids(out) == good
    got = {r.get("id") or r["lineage"]: r["reason"] for r in rejects(out)}
    assert got == bad, got
    assert report["totals"]["inputs"] == len(good) + len(bad)


GOOD_IDS = {f"c{i:05d}" for i in range(2 * GOOD)}


def hostile_record(rid: str, image: str) -> dict:
    return {"id": rid, "image": image, "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A file."}]}


# --- files that are not files: in a child process, with a timeout and a memory cap ------------

def build_in_child(cfg: Path, out: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, 8 * 2**30))

    return subprocess.run([sys.executable, "-m", "flows.cli", "build", "-c", str(cfg), "-o",
                           str(out), "--executor", "local", "--stages", "none", "--quiet"],
                          cwd=REPO, env=env_for(out.parent), capture_output=True, text=True,
                          timeout=timeout, preexec_fn=cap)


def test_a_fifo_and_a_device_are_rejected_fast_and_the_build_goes_on(tmp_path):
    root = tmp_path / "in"
    (root / "media").mkdir(parents=True)
    os.mkfifo(root / "media" / "fifo.jpg")
    hostile = [hostile_record("fifo", "fifo.jpg")]
    bad = {"fifo": "not_a_file"}
    # A character device like /dev/zero (1, 5), inside the root, where mknod is allowed
    # (root); test_the_guard_refuses_a_character_device covers devices for anyone.
    if os.geteuid() == 0:
        os.mknod(root / "media" / "zero.jpg", stat.S_IFCHR | 0o644, os.makedev(1, 5))
        hostile.append(hostile_record("zero", "zero.jpg"))
        bad["zero"] = "not_a_file"
    # A FIFO as a LibriSpeech transcript, beside a good one, in a second source.
    ls = root / "ls" / "19" / "198"
    write_flac(ls / "19-198-0001.flac", 1.0)
    (ls / "19-198.trans.txt").write_text("19-198-0001 A GOOD LINE\n")
    os.mkfifo(root / "ls" / "19" / "20-1.trans.txt")
    cfg = caption_corpus(root, hostile)
    data = yaml.safe_load(cfg.read_text())
    data["sources"].append({"name": "ls", "kind": "asr", "format": "librispeech", "path": "ls"})
    cfg.write_text(yaml.safe_dump(data))
    t0 = time.monotonic()
    proc = build_in_child(cfg, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.monotonic() - t0 < 120
    out = tmp_path / "out"
    report = json.loads((out / "report" / "build_report.json").read_text())
    got = {r.get("id") or r["lineage"]: r["reason"] for r in rejects(out)}
    assert got == {**bad, "19/20-1.trans.txt:file": "not_a_file"}
    assert written_ids(out) == GOOD_IDS | {"19-198-0001"}
    assert report["accounted"] is True


def test_the_guard_refuses_a_character_device(tmp_path):
    """A device whoever runs the tests can open (mknod in the build test above needs root)."""
    with pytest.raises(Rejected) as err:
        read_guarded("/dev/null", "image", FileLimits(), root="/dev")
    assert err.value.reason == "not_a_file"


def test_the_guard_refuses_a_socket(tmp_path):
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "sock.jpg"))
        with pytest.raises(Rejected) as err:
            read_guarded(str(tmp_path / "sock.jpg"), "image", FileLimits(), root=str(tmp_path))
    assert err.value.reason == "not_a_file"


# --- sizes ----------------------------------------------------------------------------------

def test_a_sparse_giant_image_is_rejected_from_its_size_without_reading_it(tmp_path):
    root = tmp_path / "in"
    (root / "media").mkdir(parents=True)
    with open(root / "media" / "giant.jpg", "wb") as f:
        f.truncate(8 * 2**30)  # 8 GiB, no block written
    # and one just over a small configured limit, to see the limit is the config's
    write_image(root / "media" / "big.png", (600, 600), fmt="PNG")
    cfg = caption_corpus(root, [hostile_record("giant", "giant.jpg"),
                                hostile_record("big", "big.png")],
                         limits={"max_file_mb": {"image": 0.5}})
    t0 = time.monotonic()
    report = run_build(cfg, tmp_path / "out")
    assert time.monotonic() - t0 < 60
    assert_accounted(report, tmp_path / "out", GOOD_IDS,
                     {"giant": "file_too_large", "big": "file_too_large"})
    detail = next(r["detail"] for r in rejects(tmp_path / "out") if r["id"] == "giant")
    assert "8192.0 MiB" in detail and "limits.max_file_mb.image" in detail


def test_a_file_that_grows_while_read_is_cut_at_the_limit(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(b"x" * 1000)
    stop = threading.Event()

    def grow():
        with open(path, "ab") as f:
            while not stop.is_set():
                f.write(b"y" * 65536)
                f.flush()

    limits = FileLimits(image=1.0)
    t = threading.Thread(target=grow)
    t.start()
    try:
        for _ in range(50):
            try:
                data = read_guarded(str(path), "image", limits, root=str(tmp_path))
                assert len(data) <= 2**20
            except Rejected as err:
                assert err.reason == "file_too_large"
    finally:
        stop.set()
        t.join()


# --- a symlinked transcript -----------------------------------------------------------------

def test_a_transcript_linked_out_of_the_root_is_rejected_and_never_read(tmp_path):
    root = tmp_path / "ls"
    good = root / "19" / "198"
    write_flac(good / "19-198-0001.flac", 1.0)
    write_flac(good / "19-198-0002.flac", 1.2, seed=1)
    (good / "19-198.trans.txt").write_text("19-198-0001 HELLO THERE\n19-198-0002 GOOD BYE\n")
    secret = tmp_path / "outside.txt"
    secret.write_text("20-1-0001 THE SECRET OUTSIDE THE ROOT\nroot:x:0:0:root:/root:/bin/bash\n")
    evil = root / "20" / "1"
    write_flac(evil / "20-1-0001.flac", 1.0, seed=2)  # the audio inside, the text outside
    os.symlink(secret, evil / "20-1.trans.txt")
    os.symlink("/etc", root / "etc_link")  # a folder linked in from outside: not walked
    os.symlink("..", root / "19" / "loop")  # a loop: walked once
    cfg = write_config(tmp_path, [{"name": "ls", "kind": "asr", "format": "librispeech",
                                   "path": "ls"}])
    report = run_build(cfg, tmp_path / "out")
    out = tmp_path / "out"
    rej = rejects(out)
    assert [(r["lineage"], r["reason"]) for r in rej] == \
        [("20/1/20-1.trans.txt:file", "path_outside_root")]
    assert "SECRET" not in json.dumps(rej) and "root:x" not in json.dumps(rej)
    assert written_ids(out) == {"19-198-0001", "19-198-0002"}
    assert report["accounted"] is True and report["totals"]["inputs"] == 3


# --- lying headers ---------------------------------------------------------------------------

def lying_flac(path: Path, total_samples: int) -> Path:
    """A 1 s FLAC whose STREAMINFO claims `total_samples` (36 bits)."""
    write_flac(path, 1.0)
    data = bytearray(path.read_bytes())
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # STREAMINFO comes first
    info = 8  # after "fLaC" and the block header
    v = int.from_bytes(data[info + 10:info + 18], "big")
    v = (v & ~((1 << 36) - 1)) | (total_samples & ((1 << 36) - 1))
    data[info + 10:info + 18] = v.to_bytes(8, "big")
    path.write_bytes(bytes(data))
    return path


def asr_corpus(root: Path, hostile: list[tuple[str, str]], limits: dict | None = None) -> Path:
    lines = []
    for i in range(GOOD):
        write_flac(root / "a" / f"g{i}.flac", 1.0, seed=i)
        lines.append({"id": f"g{i}", "audio": f"a/g{i}.flac", "text": f"good {i}"})
    lines += [{"id": rid, "audio": rel, "text": "hostile"} for rid, rel in hostile]
    (root / "asr.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return write_config(root, [{"name": "asr", "kind": "asr", "format": "asr_jsonl",
                                "path": "asr.jsonl"}], limits)


def test_a_flac_header_claiming_2_to_the_36_samples_is_rejected_before_decoding(tmp_path):
    root = tmp_path / "in"
    lying_flac(root / "a" / "liar.flac", 2**36 - 1)
    # and one whose header says "length unknown" (0) over ten minutes: decoding stops at max_s
    sf.write(root / "a" / "long.wav", np.zeros(16000 * 600, np.int16) + 100, 16000)
    cfg = asr_corpus(root, [("liar", "a/liar.flac"), ("long", "a/long.wav")])
    report = run_build(cfg, tmp_path / "out")
    assert_accounted(report, tmp_path / "out", {f"g{i}" for i in range(GOOD)},
                     {"liar": "audio_too_long", "long": "audio_too_long"})
    detail = {r["id"]: r["detail"] for r in rejects(tmp_path / "out")}
    assert "header says" in detail["liar"]


def test_audio_decoding_stops_at_max_s_when_the_header_does_not_say(tmp_path):
    from schemas.params import AudioConfig
    from transforms.audio import load_audio

    path = tmp_path / "long.flac"
    sf.write(path, (np.sin(np.arange(48000 * 120) / 10) * 0.3).astype(np.float32), 48000)
    data = bytearray(path.read_bytes())
    info = 8
    v = int.from_bytes(data[info + 10:info + 18], "big") & ~((1 << 36) - 1)  # 0: unknown
    data[info + 10:info + 18] = v.to_bytes(8, "big")
    with pytest.raises(Rejected) as err:
        load_audio(bytes(data), AudioConfig(max_s=30))
    assert err.value.reason == "audio_too_long"


def mp4_boxes(data: bytes, start: int, end: int, want: set[bytes], found: dict) -> None:
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if size < 8:
            return
        if kind in (b"moov", b"trak", b"mdia", b"minf", b"stbl"):
            mp4_boxes(data, pos + 8, pos + size, want, found)
        if kind in want:
            found.setdefault(kind, []).append(pos + 8)
        pos += size


def lying_mov(src: Path, dst: Path, frames: int) -> Path:
    """`src` (an mp4) with its video track's sample tables claiming `frames` frames of one
    byte each (stsz) at one tick each (stts); a QuickTime brand, as a .mov."""
    data = bytearray(src.read_bytes())
    found: dict = {}
    mp4_boxes(bytes(data), 0, len(data), {b"stsz", b"stts", b"ftyp"}, found)
    stsz, stts = found[b"stsz"][0], found[b"stts"][0]
    struct.pack_into(">II", data, stsz + 4, 1, frames)  # sample_size 1, sample_count
    struct.pack_into(">III", data, stts + 4, 1, frames, 1)  # 1 entry: frames x 1 tick
    data[found[b"ftyp"][0]:found[b"ftyp"][0] + 4] = b"qt  "
    dst.write_bytes(bytes(data))
    return dst


def video_corpus(root: Path, hostile: list[tuple[str, str]], limits: dict | None = None) -> Path:
    recs = []
    for i in range(2):
        clip(root / "v" / f"g{i}.mp4", 1 + i)
        recs.append({"id": f"g{i}", "video": f"v/g{i}.mp4", "conversations": [
            {"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "Colours."}]})
    recs += [{"id": rid, "video": rel, "conversations": [
        {"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "?"}]}
        for rid, rel in hostile]
    (root / "vid.json").write_text(json.dumps(recs))
    return write_config(root, [{"name": "vid", "kind": "video", "format": "llava",
                                "path": "vid.json", "media_root": "."}], limits)


def test_a_mov_whose_sample_tables_claim_100_million_frames(tmp_path):
    root = tmp_path / "in"
    (root / "v").mkdir(parents=True)
    base = clip(tmp_path / "base.mp4", 1)
    lying_mov(base, root / "v" / "liar.mov", 100_000_000)
    assert (root / "v" / "liar.mov").stat().st_size < 100_000
    cfg = video_corpus(root, [("liar", "v/liar.mov")])
    report = run_build(cfg, tmp_path / "out")
    assert_accounted(report, tmp_path / "out", {"g0", "g1"}, {"liar": "video_too_long"})
    # With the frame limit lifted, the tables still cannot hold in a file this size.
    cfg = video_corpus(root, [("liar", "v/liar.mov")], limits={"video_max_frames": 10**9})
    report = run_build(cfg, tmp_path / "out2")
    assert_accounted(report, tmp_path / "out2", {"g0", "g1"}, {"liar": "video_truncated"})


def test_a_16_bit_png_is_counted_by_its_decoded_bytes(tmp_path):
    from transforms.tiling import tile_image

    def png(w: int, h: int, color_type: int) -> bytes:
        row = b"\0" + bytes(w * {0: 1, 2: 3}[color_type] * 2)
        z = zlib.compressobj(9)
        raw = b"".join(z.compress(row) for _ in range(h)) + z.flush()  # a row at a time

        def chunk(t: bytes, d: bytes) -> bytes:
            return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16,
                                                                   color_type, 0, 0, 0))
                + chunk(b"IDAT", raw) + chunk(b"IEND", b""))

    rgb16 = png(10000, 9999, 2)  # 600 MB decoded, under the 100 MP limit
    assert len(rgb16) < 4 * 2**20
    with pytest.raises(Rejected) as err:
        tile_image(rgb16)
    assert err.value.reason == "image_too_large" and "limits.image_max_decoded_mb" in err.value.detail
    grey16 = png(3000, 2000, 0)  # 12 MB decoded: tiled, within a 16 MB budget
    assert len(tile_image(grey16, max_decoded=16 * 2**20).tiles) > 1
    with pytest.raises(Rejected):
        tile_image(grey16, max_decoded=8 * 2**20)


def test_max_image_pixels_above_pillows_own_limit_is_honoured(tmp_path):
    from transforms.media import open_header

    def header(w: int, h: int) -> bytes:  # a PNG header alone: open_header reads no pixels
        def chunk(t: bytes, d: bytes) -> bytes:
            return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))

    data = header(15000, 13000)  # 195 MP: Pillow alone refuses over 179 MP
    im = open_header(data, 200_000_000, 2**31)
    assert im.size == (15000, 13000)
    with pytest.raises(Rejected) as err:
        open_header(data, 150_000_000, 2**31)
    assert "150000000" in err.value.detail and "89478485" not in err.value.detail


# --- JSON made to hurt ------------------------------------------------------------------------

def test_deep_json_and_a_huge_element_cost_one_reject_each(tmp_path):
    root = tmp_path / "in"
    deep = "[" * 100_000 + "]" * 100_000
    big = json.dumps(hostile_record("big", "g0.jpg") | {"pad": "x" * (20 * 2**20)})
    recs = [caption(i, f"g{i}.jpg") for i in range(2 * GOOD)]
    for i in range(2 * GOOD):
        write_image(root / "media" / f"g{i}.jpg", (40 + i, 30), seed=i)
    body = ("[" + ",".join(json.dumps(r) for r in recs[:GOOD]) + "," + deep + "," + big + ","
            + ",".join(json.dumps(r) for r in recs[GOOD:]) + "]")
    (root / "cap.json").write_text(body)
    # the same as JSON Lines
    (root / "cap2.jsonl").write_text("\n".join([*(json.dumps(r | {"id": "l" + r["id"]})
                                                  for r in recs[:GOOD]), deep, big,
                                                *(json.dumps(r | {"id": "l" + r["id"]})
                                                  for r in recs[GOOD:])]) + "\n")
    cfg = write_config(root, [
        {"name": "cap", "kind": "caption", "format": "llava", "path": "cap.json",
         "media_root": "media"},
        {"name": "cap2", "kind": "caption", "format": "llava", "path": "cap2.jsonl",
         "media_root": "media"}])
    report = run_build(cfg, tmp_path / "out")
    out = tmp_path / "out"
    assert report["accounted"] is True
    assert written_ids(out) == GOOD_IDS | {"l" + i for i in GOOD_IDS}
    reasons = sorted((r["source"], r["index"], r["reason"]) for r in rejects(out))
    assert reasons == [("cap", GOOD, "json_too_deep"), ("cap", GOOD + 1, "element_too_large"),
                       ("cap2", GOOD, "json_too_deep"), ("cap2", GOOD + 1, "element_too_large")]
    assert report["sources"]["cap"]["inputs"] == 2 * GOOD + 2


def test_a_200_mb_string_element_is_skipped_and_the_reader_goes_on():
    """The issue's case: the reader stopped at the element and the records after it were
    neither written nor rejected. A stream, so the test holds no 200 MB of its own."""
    import io

    class Stream(io.RawIOBase):
        def __init__(self) -> None:
            self.parts = [b'[{"id": "a"}, {"id": "big", "s": "', None, b'"}, {"id": "b"}]']
            self.left = 200 * 2**20

        def readable(self) -> bool:
            return True

        def readinto(self, buf) -> int:
            while self.parts:
                p = self.parts[0]
                if p is None:
                    n = min(len(buf), self.left)
                    if n == 0:
                        self.parts.pop(0)
                        continue
                    buf[:n] = b"x" * n
                    self.left -= n
                    return n
                n = min(len(buf), len(p))
                buf[:n] = p[:n]
                self.parts[0] = p[n:]
                if not self.parts[0]:
                    self.parts.pop(0)
                return n
            return 0

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    items = list(iter_json_array(io.BufferedReader(Stream(), 1 << 20)))
    assert [(it.index, it.value, it.error and it.error.reason) for it in items] == \
        [(0, {"id": "a"}, None), (1, None, "element_too_large"), (2, {"id": "b"}, None)]
    grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grew_mb < 150  # a chunk and the 16 MiB element limit, not 200 MB


# --- what nobody foresaw ---------------------------------------------------------------------

def test_an_input_that_raises_is_its_own_internal_error_and_the_cli_exits_1(tmp_path, monkeypatch):
    import transforms.record as record

    real = record.tile_image

    def flaky(data, *a, **kw):
        if data == (tmp_path / "in" / "media" / "g5.jpg").read_bytes():
            raise ZeroDivisionError("a bug met an input")
        return real(data, *a, **kw)

    monkeypatch.setattr(record, "tile_image", flaky)
    cfg = caption_corpus(tmp_path / "in", [])
    res = CliRunner().invoke(app, ["build", "-c", str(cfg), "-o", str(tmp_path / "out"),
                                   "--executor", "local", "--stages", "none", "--quiet"])
    assert res.exit_code == 1, res.output
    assert "1 input hit an internal error" in " ".join(res.output.split())
    out = tmp_path / "out"
    report = json.loads((out / "report" / "build_report.json").read_text())
    assert report["internal_errors"] == 1 and report["accounted"] is True
    (rej,) = rejects(out)
    assert rej["reason"] == "internal_error" and rej["id"] == "c00005"
    assert "ZeroDivisionError: a bug met an input" in rej["detail"]
    assert "source 'cap', input 5" in rej["detail"]
    assert written_ids(out) == GOOD_IDS - {"c00005"}


def test_a_reader_that_raises_mid_file_rejects_the_rest_with_internal_error(tmp_path, monkeypatch):
    import storage.readers as readers

    real = readers._conversation_record

    def broken(src, rv):
        if rv.index == 3:
            raise RecursionError("maximum recursion depth exceeded")
        return real(src, rv)

    monkeypatch.setattr(readers, "_conversation_record", broken)
    cfg = caption_corpus(tmp_path / "in", [])
    items = list(read_source(load_config(cfg).sources[0]))
    assert [it.error.reason if it.error else "ok" for it in items] == \
        ["ok", "ok", "ok", "internal_error", "ok", "ok", "ok", "ok"]
    assert "RecursionError" in items[3].error.detail and "input 3" in items[3].error.detail


# --- one writer per OUT -----------------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys, time
    from storage.lock import acquire
    acquire(sys.argv[1], "the test's holder")
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
""")


def hold_lock(out: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), str(seconds)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_build_exits_at_once_naming_the_holder_or_waits(tmp_path):
    cfg = caption_corpus(tmp_path / "in", [])
    out = tmp_path / "out"
    holder = hold_lock(out, 6)
    try:
        t0 = time.monotonic()
        res = CliRunner().invoke(app, ["build", "-c", str(cfg), "-o", str(out), "--executor",
                                       "local", "--stages", "none", "--quiet"])
        assert res.exit_code == 3, res.output
        assert time.monotonic() - t0 < 5
        said = " ".join(res.output.split())
        assert f"pid {holder.pid}" in said and "the test's holder" in said
        assert not (out / "ingest").exists()  # it touched nothing
        res = CliRunner().invoke(app, ["validate", str(out)])
        assert res.exit_code == 3, res.output
        res = CliRunner().invoke(app, ["build", "-c", str(cfg), "-o", str(out), "--executor",
                                       "local", "--stages", "none", "--quiet", "--wait-lock", "60"])
        assert res.exit_code == 0, res.output
        assert holder.poll() is not None  # it waited for the holder to end
    finally:
        holder.kill()
        holder.wait()
    assert written_ids(out) == GOOD_IDS


def test_two_concurrent_builds_into_one_out_both_finish(tmp_path):
    """The issue's race: the second deleted the first one's temporary parts (8 of 8 runs
    failed). Now the second waits for the first and keeps what it wrote."""
    cfg = caption_corpus(tmp_path / "in", [])
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "flows.cli", "build", "-c", str(cfg), "-o", str(out),
           "--executor", "local", "--stages", "none", "--quiet", "--wait-lock", "180"]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env_for(tmp_path / f"p{i}"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    results = [p.communicate(timeout=200) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1][-2000:] for r in results]
    report = json.loads((out / "report" / "build_report.json").read_text())
    assert report["accounted"] is True and written_ids(out) == GOOD_IDS
    assert not list(out.rglob("*.tmp-*"))


def test_a_dead_holders_lock_is_taken_over_with_a_log_line(tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (out / out_lock.LOCK_NAME).write_text(json.dumps(
        {"host": "h", "pid": int(dead), "started": "2026-01-01T00:00:00+00:00",
         "command": "a killed build"}))
    with caplog.at_level("WARNING"), out_lock.out_lock(str(out), "this test"):
        assert out_lock.holder(str(out))["command"] == "this process"
    assert "taking over the lock" in caplog.text and "a killed build" in caplog.text
    assert out_lock.holder(str(out)) is None


# --- Great Expectations state ---------------------------------------------------------------

def test_a_zero_byte_gx_checkpoint_is_rebuilt_not_fatal(tmp_path):
    from flows.validation.gate import validate_stage
    from schemas.recipes import DEFAULT_RECIPES

    cfg = caption_corpus(tmp_path / "in", [])
    out = tmp_path / "out"
    build(load_config(cfg), str(out), executor=LocalExecutor(),
          stages=[r for r in DEFAULT_RECIPES if r.stage == "1.2"])
    assert validate_stage(str(out), "stage_1.2")["passed"]
    gx = out / "validation" / "gx"
    cps = sorted((gx / "checkpoints").glob("*.json"))
    assert cps
    cps[0].write_bytes(b"")  # what a full disk left
    (gx / "great_expectations.yml").write_bytes(b"")
    assert validate_stage(str(out), "stage_1.2")["passed"]
    assert cps[0].stat().st_size > 0 and (gx / "great_expectations.yml").stat().st_size > 0
    assert not list(gx.rglob("*.tmp-*"))
