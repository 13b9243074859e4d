"""What a fork per utterance costs the espeak-ng helper (transforms/espeak_helper.py), in its own
small interpreter: the library call in a loop, the same call in a forked child per sentence
(what the helper does for every utterance), and a fork whose child does nothing.

    .venv/bin/python bench/bench_fork_cost.py [--n 300]

It starts `python -I -S` (as the backend starts the helper: no site-packages) on itself with
the library and its data, and prints ms a sentence, wall and CPU (children included).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time


def child(library: str, data_parent: str, n: int) -> None:
    import ctypes

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                    "transforms"))
    import espeak_helper as h

    lib = ctypes.CDLL(library)
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    if lib.espeak_Initialize(2, 0, data_parent.encode(), 0) <= 0:
        raise SystemExit("espeak-ng failed to initialise")
    h._set_voice(lib, b"en", 0)
    texts = [f"Question {i}: how many plums would the purple ant number {i * 7} from Brazil "
             f"eat on day {i % 31}?".encode() for i in range(n)]

    def cpu() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    cases = [("library call in a loop", lambda t: h._speak(lib, t)),
             ("a forked child speaks it", lambda t: h._forked(h._speak, lib, t)),
             ("a forked child does nothing", lambda t: h._forked(lambda: b""))]
    for name, fn in cases:
        t0, c0 = time.perf_counter(), cpu()
        for t in texts:
            fn(t)
        wall = (time.perf_counter() - t0) / n * 1000
        print(f"{name:28s} wall {wall:6.2f} ms  cpu {(cpu() - c0) / n * 1000:6.2f} ms")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    args = ap.parse_args()
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from transforms.tts import EspeakBackend

    backend = EspeakBackend(mode="inprocess")
    subprocess.run([sys.executable, "-I", "-S", os.path.abspath(__file__), "--child",
                    backend._library, os.path.dirname(backend._data), str(args.n)], check=True)


if __name__ == "__main__":
    main()
