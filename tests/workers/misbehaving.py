"""A session worker that misbehaves on purpose, selected by STUDIO_WORKER_COMMAND in tests.

It speaks the worker protocol (studio.worker.protocol) without Spark. STUDIO_TEST_WORKER picks
the fault:

  never-ready     reads its start message, then never answers
  crash-on-start  writes a reason to its log and exits with code 7
  ignore-sigterm  becomes ready and echoes code, but ignores the shutdown message and SIGTERM,
                  and leaves a grandchild that ignores SIGTERM too (only SIGKILL to the group ends it)
  echo            a well-behaved stand-in: ready at once, echoes code, exits on shutdown (for
                  tests about many sessions, where Spark would only cost time)
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

from studio.worker import protocol


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--orphan-timeout", type=float)
    args = parser.parse_args()
    mode = os.environ.get("STUDIO_TEST_WORKER", "never-ready")
    # Only the first service is served: these workers are for faults, not for restarts.
    sock, _ = socket.socket(fileno=args.listen_fd).accept()
    reader = sock.makefile("rb")
    start = protocol.decode(reader.readline())
    assert start["op"] == "start"
    if mode == "never-ready":
        while True:
            time.sleep(3600)
    if mode == "crash-on-start":
        print("misbehaving worker: crashing on purpose before Spark starts", file=sys.stderr, flush=True)
        return 7
    if mode == "ignore-sigterm":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        subprocess.Popen(
            [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(3600)"]
        )
        sock.sendall(protocol.encode({"op": "ready", "app_id": "fake-app", "spark_ui_url": None, "python_pid": os.getpid()}))
        for line in reader:
            message = protocol.decode(line)
            if message["op"] == "execute":
                output = {"status": "ok", "data": {"text/plain": message["code"]}}
                sock.sendall(protocol.encode({"op": "result", "id": message["id"], "output": output}))
            elif message["op"] == "activate":
                sock.sendall(protocol.encode({"op": "activated", "ok": True, "static": [], "error": None}))
        while True:  # the service hung up; still refuse to go
            time.sleep(3600)
    if mode == "echo":
        sock.sendall(protocol.encode({"op": "ready", "app_id": "fake-app", "spark_ui_url": None, "python_pid": os.getpid()}))
        for line in reader:
            message = protocol.decode(line)
            if message["op"] == "execute":
                output = {"status": "ok", "data": {"text/plain": message["code"]}}
                sock.sendall(protocol.encode({"op": "result", "id": message["id"], "output": output}))
            elif message["op"] == "activate":
                sock.sendall(protocol.encode({"op": "activated", "ok": True, "static": [], "error": None}))
            elif message["op"] == "shutdown":
                return 0
        return 0
    raise SystemExit(f"unknown STUDIO_TEST_WORKER mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main())
