"""A small process that speaks for EspeakBackend: started once, forks itself per utterance.

espeak-ng carries state from one utterance to the next, so a sentence's samples would depend
on what the process spoke before. Forking a child of the freshly initialised library per
utterance makes the audio a function of (text, voice) alone; forking this small interpreter
(no site-packages, no numpy, the library loaded) costs far less than forking a build worker
that holds torch, OpenCV and the transforms.

Run as `python -I -S espeak_helper.py LIBRARY DATA_PARENT`; it imports only the standard
library, so it starts in milliseconds. Per (voice, rate) it forks a voice process once, which
sets the voice (loading its dictionary) and speaks nothing; each utterance is a fork of that.
Protocol on stdin/stdout, little-endian:
- on start it writes `R` + u32 sample rate (or `E` + u32 length + message);
- a request is u32 length + `voice \\0 rate \\0 text` (UTF-8);
- the reply is `A` + u32 length + int16 PCM, or `E` + u32 length + message.
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys


def _read_exact(fd: int, n: int) -> bytes:
    chunks, left = [], n
    while left:
        b = os.read(fd, left)
        if not b:
            return b""
        chunks.append(b)
        left -= len(b)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _reply(fd: int, tag: bytes, body: bytes) -> None:
    _write_all(fd, tag + struct.pack("<I", len(body)) + body)


def _set_voice(lib: ctypes.CDLL, voice: bytes, rate: int) -> None:
    if lib.espeak_SetVoiceByName(voice) != 0:
        raise ValueError(f"espeak-ng has no voice {voice.decode(errors='replace')!r}")
    if rate:
        lib.espeak_SetParameter(1, rate, 0)  # espeakRATE


def _speak(lib: ctypes.CDLL, text: bytes) -> bytes:
    chunks: list[bytes] = []
    cb_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                               ctypes.c_void_p)

    def cb(wav, n, _events):  # noqa: ANN001, ANN202 - called by the library
        if n > 0 and wav:
            chunks.append(ctypes.string_at(wav, n * 2))
        return 0

    keep = cb_type(cb)
    lib.espeak_SetSynthCallback(keep)
    data = text + b"\0"
    # position 0, POS_CHARACTER (1), no end, espeakCHARS_UTF8 (1)
    err = lib.espeak_Synth(data, len(data), 0, 1, 0, 1, None, None)
    if err != 0:
        raise ValueError(f"espeak_Synth returned error {err}")
    lib.espeak_Synchronize()
    return b"".join(chunks)


def _forked(fn, *args) -> bytes:  # noqa: ANN001
    """fn(*args) in a forked child (which exits after), as `A` + bytes or `E` + message."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            out = b"A" + fn(*args)
        except BaseException as err:  # noqa: BLE001 - reported as text
            out = b"E" + f"{type(err).__name__}: {err}".encode(errors="replace")
        _write_all(w, out)
        os._exit(0)
    os.close(w)
    got = []
    while chunk := os.read(r, 1 << 20):
        got.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    return b"".join(got) or f"Ethe speaking child died (status {status})".encode()


def _voice_server(lib: ctypes.CDLL, voice: bytes, rate: int, fin: int, fout: int) -> None:
    """A process with one voice set and nothing spoken yet: it forks a child per text, so
    every utterance starts from the same state, and the voice's dictionary is loaded once
    instead of once per utterance."""
    try:
        _set_voice(lib, voice, rate)
        failed = b""
    except ValueError as err:
        failed = str(err).encode()
    while True:
        head = _read_exact(fin, 4)
        if not head:
            os._exit(0)
        text = _read_exact(fin, struct.unpack("<I", head)[0])
        body = (b"E" + failed) if failed else _forked(_speak, lib, text)
        _reply(fout, body[:1], body[1:])


def main(library: str, data_parent: str) -> None:
    fin, fout = sys.stdin.fileno(), sys.stdout.fileno()
    lib = ctypes.CDLL(library)
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Initialize.restype = ctypes.c_int
    # AUDIO_OUTPUT_SYNCHRONOUS (2): espeak_Synth returns when the audio is complete.
    rate = lib.espeak_Initialize(2, 0, data_parent.encode(), 0)
    if rate <= 0:
        _reply(fout, b"E", f"espeak-ng failed to initialise with data at {data_parent}".encode())
        return
    _write_all(fout, b"R" + struct.pack("<I", rate))
    servers: dict[tuple[bytes, int], tuple[int, int]] = {}  # (voice, rate) -> (to, from)
    pids: list[int] = []
    while True:
        head = _read_exact(fin, 4)
        if not head:  # the backend closed the pipe: done
            for to_w, from_r in servers.values():  # a voice process exits at EOF
                os.close(to_w)
                os.close(from_r)
            for pid in pids:  # waited for, so that their CPU time counts as this process's
                os.waitpid(pid, 0)
            return
        voice, speed, text = _read_exact(fin, struct.unpack("<I", head)[0]).split(b"\0", 2)
        key = (voice, int(speed))
        if key not in servers:
            to_r, to_w = os.pipe()
            from_r, from_w = os.pipe()
            pid = os.fork()
            if pid == 0:
                # Only its own pipe ends: the backend sees EOF when the helper dies.
                for fd in (fin, fout, to_w, from_r, *(fd for pair in servers.values() for fd in pair)):
                    os.close(fd)
                _voice_server(lib, voice, int(speed), to_r, from_w)
            os.close(to_r)
            os.close(from_w)
            servers[key] = (to_w, from_r)
            pids.append(pid)
        to_w, from_r = servers[key]
        _write_all(to_w, struct.pack("<I", len(text)) + text)
        tag = _read_exact(from_r, 1)
        head = _read_exact(from_r, 4)
        if not tag or not head:
            del servers[key]
            _reply(fout, b"E", b"the voice process died")
            continue
        _reply(fout, tag, _read_exact(from_r, struct.unpack("<I", head)[0]))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
