"""colshard's benchmark: synthetic/real datasets, exact ground truth, baselines, harness, report.

Entry point for the CLI: ``bench.main(argv)`` (``colshard bench ...``).
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``colshard bench`` with ``argv``; imports the harness lazily (faiss, matplotlib)."""
    from bench.__main__ import main as _main

    return _main(argv)


__all__ = ["main"]
