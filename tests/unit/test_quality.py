"""Tooling gates run by the test command: ruff, mypy (strict), import-linter contracts, and the
SDK's promise to import neither FastAPI nor Ray."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("tool", ["ruff", "mypy", "lint-imports"])
def test_tool_is_clean(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is not installed: install the 'test' extra")
    args = {"ruff": ("ruff", "check", "."), "mypy": ("mypy",),
            "lint-imports": ("lint-imports",)}[tool]
    result = run(*args)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]


def test_sdk_imports_neither_fastapi_nor_ray() -> None:
    code = ("import sys, gateway.client; "
            "bad = [m for m in ('fastapi', 'ray', 'starlette') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
