"""A GPU sandbox's Docker device request: only where the engine has the NVIDIA runtime
registered (nvidia-container-toolkit); elsewhere the sandbox still sees its GPU ids in
its env (agent/resources.py), which is all a GPU-less engine can show it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import docker

from agent.runtime.labels import LABEL_GPUS

__all__ = ["gpu_requests", "has_nvidia_runtime"]


def has_nvidia_runtime(client: Any) -> bool:
    """Whether the engine lists an ``nvidia`` runtime (``docker info``'s Runtimes)."""
    return "nvidia" in (client.info().get("Runtimes") or {})


def gpu_requests(client: Any, labels: Mapping[str, str]) -> list[Any] | None:
    """The device requests for the GPU ids in ``labels`` (None: none, or the engine
    cannot give GPUs). Asks the engine only for a sandbox given GPUs."""
    ids = [g for g in labels.get(LABEL_GPUS, "").split(",") if g]
    if not ids or not has_nvidia_runtime(client):
        return None
    return [docker.types.DeviceRequest(device_ids=ids, capabilities=[["gpu"]])]
