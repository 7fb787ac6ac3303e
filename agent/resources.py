"""What this agent advertises for placement (cores, memory, GPU ids), and what a
sandbox given GPUs sees of them.

The scheduler chooses which of our GPU ids a sandbox gets (``SandboxInfo.gpu_ids``,
each id to one sandbox at a time); the agent makes the sandbox see those alone:
``CUDA_VISIBLE_DEVICES`` and ``NVIDIA_VISIBLE_DEVICES`` in its env, and on Docker a
device request when the engine has the NVIDIA runtime (agent/runtime/docker.py), on
the local runtime its GPUs' device nodes bound into its private /dev (``gpu_binds``).
On an agent with GPUs, a sandbox given none sees none (``NVIDIA_VISIBLE_DEVICES=void``).
The ids are kept in a label, so that a restarted agent reports them again.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

import psutil

from agent.runtime.labels import LABEL_GPUS
from aviato.protocol import RegisterAgent, SandboxSpec

__all__ = [
    "LABEL_GPUS",
    "Capacity",
    "detect_gpus",
    "gpu_binds",
    "gpu_ids_of",
    "parse_gpus",
    "parse_memory",
    "with_gpus",
]

_GPU_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_NVIDIA_SMI_LINE = re.compile(r"^GPU (\d+):", re.MULTILINE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


@dataclass(frozen=True, slots=True)
class Capacity:
    """What the agent advertises (RegisterAgent's ``cpus``, ``memory_bytes``, ``gpus``)."""

    cpus: float
    memory_bytes: int
    gpus: tuple[str, ...]

    @classmethod
    def of_host(
        cls,
        cpus: float | None = None,
        memory_bytes: int | None = None,
        gpus: tuple[str, ...] | None = None,
    ) -> Capacity:
        """This host's, each unless given: the cores we may run on, its memory, and
        the GPUs ``nvidia-smi -L`` lists (none without it)."""
        return cls(
            cpus=float(len(os.sched_getaffinity(0))) if cpus is None else cpus,
            memory_bytes=psutil.virtual_memory().total if memory_bytes is None else memory_bytes,
            gpus=detect_gpus() if gpus is None else gpus,
        )

    def advertised(self, msg: RegisterAgent) -> RegisterAgent:
        """``msg`` carrying this capacity."""
        return dataclasses.replace(
            msg, cpus=self.cpus, memory_bytes=self.memory_bytes, gpus=self.gpus
        )


def detect_gpus(timeout: float = 10.0) -> tuple[str, ...]:
    """The GPU indexes ``nvidia-smi -L`` lists; none where it is missing or fails."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return ()
    try:
        out = subprocess.run(
            [smi, "-L"], capture_output=True, text=True, timeout=timeout, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(_NVIDIA_SMI_LINE.findall(out))


def parse_gpus(text: str) -> tuple[str, ...]:
    """``--gpus 0,1`` -> ("0", "1"); "" or "none" -> (): advertise none."""
    if text.strip().lower() in ("", "none"):
        return ()
    ids = tuple(dict.fromkeys(part.strip() for part in text.split(",")))
    bad = [g for g in ids if not _GPU_ID.fullmatch(g)]
    if bad:
        raise ValueError(f"--gpus takes GPU ids such as 0,1 (or none), got {bad[0]!r}")
    return ids


def parse_memory(text: str) -> int:
    """``--memory 16G`` -> bytes (suffixes K, M, G, T: powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtKMGT]?)i?[bB]?\s*", text)
    if match is None:
        raise ValueError(f"--memory takes bytes, or a size such as 16G, got {text!r}")
    return int(float(match[1]) * _UNITS[match[2].lower()])


def gpu_ids_of(labels: Mapping[str, str]) -> tuple[str, ...]:
    """The GPU ids a sandbox's labels say it was given."""
    value = labels.get(LABEL_GPUS, "")
    return tuple(value.split(",")) if value else ()


def with_gpus(
    spec: SandboxSpec, gpu_ids: tuple[str, ...], agent_gpus: tuple[str, ...]
) -> SandboxSpec:
    """``spec`` with the env that shows the sandbox its GPUs alone (unchanged on an
    agent with none: nothing to hide)."""
    if not agent_gpus and not gpu_ids:
        return spec
    ids = ",".join(gpu_ids)
    env = {**spec.env, "CUDA_VISIBLE_DEVICES": ids, "NVIDIA_VISIBLE_DEVICES": ids or "void"}
    return dataclasses.replace(spec, env=env)


#: The NVIDIA driver's device nodes every GPU user needs besides its /dev/nvidiaN.
_NVIDIA_SHARED = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset")


def gpu_binds(spec: SandboxSpec, dev: str = "/dev") -> list[str]:
    """bubblewrap arguments binding the device nodes of the GPUs ``spec``'s env names
    (set by ``with_gpus``) into the sandbox's own /dev, which holds no GPU otherwise;
    nodes this host lacks are skipped (a GPU-less host: none)."""
    ids = [g for g in spec.env.get("NVIDIA_VISIBLE_DEVICES", "").split(",") if g.isdigit()]
    if not ids:
        return []
    names = [f"nvidia{g}" for g in ids] + list(_NVIDIA_SHARED)
    out: list[str] = []
    for name in names:
        path = os.path.join(dev, name)
        if os.path.exists(path):
            out += ["--dev-bind", path, f"/dev/{name}"]
    return out
