"""A server in a subprocess on 127.0.0.1, ready when it says so (benchmarks and tests).

``ServiceProcess(cmd, ready_prefix=...)`` starts ``cmd`` and reads its stdout until a line
starting with ``ready_prefix`` (``fastvae serve`` prints ``fastvae serve: listening on
http://HOST:PORT``; the port is taken from that line), or, with ``ready_url``, polls that URL
until it answers 200; both within ``deadline`` seconds. ``stop()`` sends SIGTERM (or the given
signal) and returns (exit status, stdout, stderr).
"""

from __future__ import annotations

import http.client
import os
import selectors
import signal
import socket
import subprocess
import time


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for servers that cannot take port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServiceProcess:
    def __init__(self, cmd, *, ready_prefix: str | None = None, ready_url: tuple[int, str] | None = None,
                 deadline: float = 120.0, env=None):
        # its own process group: stop() reaches the worker processes a server may start (litserve),
        # which would otherwise hold the pipes open; with ready_url nothing reads its output
        quiet = ready_prefix is None
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL if quiet else subprocess.PIPE,
                                     stderr=subprocess.DEVNULL if quiet else subprocess.PIPE,
                                     text=True, env=env, start_new_session=True)
        self.port = None
        self.lines: list[str] = []
        try:
            if ready_prefix is not None:
                self._wait_for_line(ready_prefix, time.monotonic() + deadline)
            else:
                self.port = ready_url[0]
                self._poll(ready_url[1], time.monotonic() + deadline)
        except Exception:
            self.stop(signal.SIGKILL)
            raise

    def _wait_for_line(self, prefix: str, end: float) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            while self.port is None:
                left = end - time.monotonic()
                if left <= 0 or not selector.select(left):
                    raise RuntimeError(f"no '{prefix}' line in time: {self.lines}")
                line = self.proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"server exited ({self.proc.wait()}): {self.lines} {self.proc.stderr.read()[-2000:]}")
                self.lines.append(line)
                if line.startswith(prefix):
                    self.port = int(line.strip().rsplit(":", 1)[1])
        finally:
            selector.close()

    def _poll(self, path: str, end: float) -> None:
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode})")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", path)
                if conn.getresponse().status == 200:
                    conn.close()
                    return
                conn.close()
            except OSError:
                pass
            if time.monotonic() > end:
                raise RuntimeError(f"{path} never answered 200")
            time.sleep(0.05)  # pacing between polls; readiness itself is the 200 answer

    def stop(self, sig=signal.SIGTERM, timeout: float = 60.0):
        """Signal the server's process group; SIGKILL it if still there after ``timeout``."""
        self._signal_group(sig)
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            out, err = self.proc.communicate()
        self._signal_group(signal.SIGKILL)  # workers left behind by a server that exited
        return self.proc.returncode, out or "", err or ""

    def _signal_group(self, sig) -> None:
        try:
            os.killpg(self.proc.pid, sig)  # the group this object started (start_new_session)
        except ProcessLookupError:
            pass
