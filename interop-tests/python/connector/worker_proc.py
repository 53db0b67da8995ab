"""One MiniWorker (a TP rank) in its own interpreter, driven by sim.WorkerProcess over stdin/stdout.

Frames are an 8-byte little-endian length and a pickle. The first frame is ("init", spec, rank); the
stand-in vllm modules are installed before any frame that carries vLLM objects is unpickled. Replies
are ("ok", value) or ("error", traceback text). stdout is reserved for frames: prints and logs go to
stderr.
"""

import os
import pickle
import struct
import sys
import traceback

_OUT = os.fdopen(os.dup(1), "wb")
os.dup2(2, 1)
sys.stdout = sys.stderr
_IN = sys.stdin.buffer


def _send(value) -> None:
    data = pickle.dumps(value)
    _OUT.write(struct.pack("<Q", len(data)) + data)
    _OUT.flush()


def _receive():
    header = _IN.read(8)
    if len(header) < 8:
        return None
    (length,) = struct.unpack("<Q", header)
    return pickle.loads(_IN.read(length))


def main() -> None:
    import fakevllm
    import sim

    message = _receive()
    assert message[0] == "init", message
    spec, rank = message[1], message[2]
    fakevllm.install(spec.era)
    try:
        worker = sim.MiniWorker(spec, rank)
    except Exception:  # noqa: BLE001
        _send(("error", traceback.format_exc()))
        return
    _send(("ok", None))
    while True:
        message = _receive()
        if message is None:
            return
        command, args = message[0], message[1:]
        try:
            value = getattr(worker, command)(*args)
        except Exception:  # noqa: BLE001
            _send(("error", traceback.format_exc()))
            continue
        _send(("ok", value))
        if command == "shutdown":
            return


if __name__ == "__main__":
    main()
