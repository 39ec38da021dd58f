"""Where this process runs in Ray: its runtime context and node id, read without starting a Ray
(kept apart from ``cluster.settings`` so that modules reading settings never import Ray)."""

from __future__ import annotations

from typing import Any


def ray_runtime_context() -> Any | None:
    """Ray's runtime context of this process; None outside Ray (without starting one:
    ``ray.get_runtime_context()`` would start a local Ray when none is initialised)."""
    try:
        import ray

        return ray.get_runtime_context() if ray.is_initialized() else None
    except Exception:
        return None


def ray_node_id() -> str:
    """The id of the Ray node this process runs on; "" outside Ray."""
    ctx = ray_runtime_context()
    try:
        return str(ctx.get_node_id()) if ctx is not None else ""
    except Exception:
        return ""


def restarted_by_ray() -> bool:
    """Whether Ray restarted this actor (False outside Ray, or when Ray cannot tell)."""
    ctx = ray_runtime_context()
    try:
        return ctx is not None and bool(ctx.was_current_actor_reconstructed)
    except Exception:
        return False
