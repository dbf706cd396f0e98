"""Shared helpers for the code-environment tests (no tests here): real virtualenvs made
with uv from tiny local wheels, no package index."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from nodes.envs.uv import uv_bin, uv_environ
from tests.wheels import make_wheel

PYTHON_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"

# A package shipyard's interpreter does not have, and a fake of one it depends on.
TINY = "sy-tiny"
FAKE_MSGSPEC = {"msgspec/__init__.py": "__version__ = '0.0.1'\nVERSION = '0.0.1'\n"}


def make_env(root: Path, wheels: Path, pins: list[str]) -> str:
    """A venv at ``root`` with exactly ``pins`` installed from ``wheels``; its python."""
    env = uv_environ()
    subprocess.run([uv_bin(), "venv", "--python", PYTHON_VERSION, "--python-preference",
                    "only-system", str(root)], env=env, check=True, capture_output=True,
                   timeout=120)
    python = root / "bin" / "python"
    if pins:
        subprocess.run([uv_bin(), "pip", "install", "--python", str(python), "--no-index",
                        "--find-links", str(wheels), *pins], env=env, check=True,
                       capture_output=True, timeout=120)
    return str(python)


def make_wheels(dest: Path) -> Path:
    """sy-tiny 1.0 and 2.0, and a msgspec 0.0.1 that is not msgspec."""
    make_wheel(dest, TINY, "1.0")
    make_wheel(dest, TINY, "2.0")
    make_wheel(dest, "msgspec", "0.0.1", files=FAKE_MSGSPEC)
    return dest
