"""The embedded stack as a child process: how the demo, the tests and the evaluator run
`fusionrec up` and stop it without leaving anything behind."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fusionrec.broker import free_port, terminate


@dataclass
class ChildStack:
    process: subprocess.Popen[bytes]
    broker_port: int
    grpc_port: int
    log: Path

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.broker_port}"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM (the worker stops the broker it started), then SIGKILL the whole group."""
        terminate(self.process, timeout)


def spawn_stack(state_dir: Path, env: Mapping[str, str] | None = None) -> ChildStack:
    """Start `fusionrec up` on free ports with `env` (FUSIONREC_* settings) over ours; its
    output goes to `state_dir/stack.log`."""
    state_dir.mkdir(parents=True, exist_ok=True)
    broker_port, grpc_port = free_port(), free_port()
    child_env = {
        **os.environ,
        "FUSIONREC_KAFKA__EMBEDDED_PORT": str(broker_port),
        "FUSIONREC_LOG_LEVEL": "WARNING",
        **(env or {}),
    }
    cmd = [
        sys.executable,
        "-m",
        "fusionrec",
        "up",
        "--data-dir",
        str(state_dir / "state"),
        "--port",
        str(grpc_port),
    ]
    log = state_dir / "stack.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            cmd, env=child_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return ChildStack(process, broker_port, grpc_port, log)
