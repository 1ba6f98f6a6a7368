"""A kvtierd of your own for tests, benchmarks and notebooks: started in a temporary folder (or
an earlier one's, for a restart), ready once it sends READY=1 on a NOTIFY_SOCKET of ours.

    from kvtier.local_daemon import LocalDaemon, find_daemon
    d = LocalDaemon(find_daemon(), "--ram-budget", "256MiB")
    ...  # kvtier.Client(d.socket)
    d.stop()
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

# Only a stuck daemon reaches this; a loaded two-core machine starts one in a few seconds.
READY_DEADLINE_SECONDS = 120


def find_daemon(repository: Optional[str] = None, builds: Sequence[str] = ("debug", "release")) -> Optional[str]:
    """``$KVTIER_DAEMON``, else the first of ``builds`` built in ``repository`` (by default the
    checkout this package lives in); None when there is none."""
    env = os.environ.get("KVTIER_DAEMON")
    if env:
        return env if os.access(env, os.X_OK) else None
    repo = Path(repository) if repository else Path(__file__).resolve().parents[4]
    for build in builds:
        candidate = repo / ".build" / build / "kvtierd"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return None


class LocalDaemon:
    """A kvtierd in a fresh temporary folder, or in `directory` (a restart on an earlier
    daemon's socket path and state)."""

    def __init__(self, binary: str, *args: str, directory: Optional[str] = None, prefix: str = "kvtier-daemon-"):
        self.dir = directory or tempfile.mkdtemp(prefix=prefix)
        os.chmod(self.dir, 0o755)  # another uid must reach the socket (test_other_uid)
        self.socket = os.path.join(self.dir, "s.sock")
        self.log = open(os.path.join(self.dir, "kvtierd.log"), "w+")
        self.argv = [binary, "--socket", self.socket, "--state-dir", os.path.join(self.dir, "state"), *args]
        self._launch()

    def _launch(self) -> None:
        """Starts kvtierd and waits for READY=1 on a NOTIFY_SOCKET of our own (sent once the
        socket listens): event-driven, with a deadline only a stuck daemon reaches, so a
        loaded machine is slow here but never fails."""
        notify_path = os.path.join(self.dir, f"notify-{os.getpid()}-{time.monotonic_ns()}")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(notify_path)
        try:
            env = dict(os.environ, NOTIFY_SOCKET=notify_path)
            env.pop("WATCHDOG_USEC", None)
            self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT, env=env)
            exited = os.pidfd_open(self.proc.pid) if hasattr(os, "pidfd_open") else None
            try:
                deadline = time.monotonic() + READY_DEADLINE_SECONDS
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        log = self.log_text()
                        self.stop()
                        raise RuntimeError(f"kvtierd sent no READY=1 within {READY_DEADLINE_SECONDS} s: {log}")
                    waiting = [notify] + ([exited] if exited is not None else [])
                    # Without a pidfd, look at the process every second.
                    ready, _, _ = select.select(waiting, [], [], left if exited is not None else min(left, 1.0))
                    if notify in ready and b"READY=1" in notify.recv(4096):
                        return
                    if self.proc.poll() is not None:
                        log = self.log_text()
                        self.stop()
                        raise RuntimeError(f"kvtierd exited ({self.proc.returncode}) before READY=1: {log}")
            finally:
                if exited is not None:
                    os.close(exited)
        finally:
            notify.close()
            os.unlink(notify_path)

    def log_text(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-4000:]

    def _terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> None:
        """Stops the daemon with SIGTERM and starts it again on the same state directory: its
        RAM tier starts empty, so cached pages come back from the disk tier."""
        self._terminate()
        if os.path.exists(self.socket):
            os.unlink(self.socket)
        self._launch()

    def stop(self) -> None:
        self._terminate()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
