"""Start and stop `slicer-hf serve` processes: the one helper the demo, the benchmarks and the tests share.

The server's stdout is read until its ready line and drained for the rest of its life; its stderr (the log) goes
to a file, so neither pipe can fill up and stall the server.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

from .errors import SlicerError


class ServerStartError(SlicerError, RuntimeError):
    """A server process exited or stayed silent before it was ready."""


def serve_command(model: str, args: Sequence[str] = ()) -> list[str]:
    """`slicer-hf serve` for `model` on a free loopback port (later `args` override earlier ones)."""
    return [sys.executable, "-m", "slicer_hf.cli", "serve", "--model", model, "--port", "0", *args]


def parse_server_url(line: str) -> str | None:
    """The URL in `slicer-hf serve`'s ready line ('slicer-hf serving M on grpc://host:port'), else None."""
    return line.rsplit(" on ", 1)[1].strip() if line.startswith("slicer-hf serving ") and " on " in line else None


def start_server(
    model_or_command: str | Sequence[str],
    args: Sequence[str] = (),
    timeout_s: float = 300.0,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen[str], str]:
    """Start a server and wait for its ready line; returns the process and its URL.

    Args:
        model_or_command: a model for `serve_command`, or a whole command line.
        args: more `slicer-hf serve` options (with a model).
        timeout_s: how long to wait for the ready line.
        env: variables added to this process's environment.
    """
    cmd = serve_command(model_or_command, args) if isinstance(model_or_command, str) else list(model_or_command)
    with tempfile.TemporaryFile(mode="w+") as log:  # the child keeps its own descriptor after this closes
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
        )
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:  # keeps draining stdout for the server's whole life
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, name="slicer-server-stdout", daemon=True).start()
        deadline = time.monotonic() + timeout_s
        try:
            while (left := deadline - time.monotonic()) > 0:
                try:
                    line = lines.get(timeout=left)
                except queue.Empty:
                    break
                if line is None:
                    proc.wait(timeout=30)
                    log.seek(0)
                    raise ServerStartError(f"server exited with {proc.returncode}: {log.read()[-2000:]}")
                if (url := parse_server_url(line)) is not None:
                    return proc, url
            raise ServerStartError(f"server did not start within {timeout_s} s")
        except BaseException:
            stop_server(proc)
            raise


def stop_server(proc: subprocess.Popen[str], timeout_s: float = 30.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout_s`."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
