"""Tooling gates run by the test command: ruff (lint and format), mypy (strict), import-linter
contracts, the SDK's promise to import neither FastAPI nor Ray, and the HTTP app's to import
neither Ray nor the coordinator."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("tool", ["ruff", "ruff-format", "mypy", "lint-imports"])
def test_tool_is_clean(tool: str) -> None:
    exe = tool.split("-")[0] if tool == "ruff-format" else tool
    if shutil.which(exe) is None:
        pytest.fail(f"{exe} is not installed: install the 'test' extra")
    args = {
        "ruff": ("ruff", "check", "."),
        "ruff-format": ("ruff", "format", "--check", "."),
        "mypy": ("mypy",),
        "lint-imports": ("lint-imports",),
    }[tool]
    result = run(*args)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]


def test_http_app_imports_neither_ray_nor_the_coordinator() -> None:
    code = (
        "import sys, gateway.app, gateway.server; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'coordinator', 'shard')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_sdk_imports_neither_fastapi_nor_ray() -> None:
    code = (
        "import sys, gateway.client; "
        "bad = [m for m in ('fastapi', 'ray', 'starlette') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
