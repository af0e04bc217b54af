"""How a site starts Flower's own processes: the venv's commands, a quiet environment, its own FLWR_HOME.

`fedrad site join` replaces itself with ``flower-supernode``; the coordinator's commands
(`fedrad local`, `fedrad coordinator start`) start theirs the same way, so both sides share this.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

QUIET_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1",
             "PYTHONIOENCODING": "utf-8"}


def flower_env(home: Path) -> dict[str, str]:
    """Environment of a Flower process: its own FLWR_HOME, and this venv first on PATH (the
    SuperLink and SuperNodes start `flower-superexec` and the app processes by name)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, **QUIET_ENV, "FLWR_HOME": str(home), "PATH": path}


def flower_bin(name: str) -> str:
    """A Flower command from the same environment as this Python (the venv's, not PATH's)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name
