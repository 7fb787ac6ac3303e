"""The agent's side of resources (agent/resources.py, agent/runtime/docker_gpus.py):
what it advertises, GPUs found by nvidia-smi, what a sandbox's env shows of its GPUs,
and the Docker device request made only where the engine has the NVIDIA runtime."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

from agent.resources import (
    Capacity,
    detect_gpus,
    gpu_binds,
    parse_gpus,
    parse_memory,
    with_gpus,
)
from agent.runtime.docker_gpus import gpu_requests
from agent.runtime.labels import LABEL_GPUS, sandbox_labels
from aviato.protocol import SandboxSpec

SPEC = SandboxSpec("python:3.11", "sleep", env={"A": "1"})


def test_gpu_ids_and_memory_sizes_parse_or_say_what_is_wrong() -> None:
    assert parse_gpus("0,1") == ("0", "1")
    assert parse_gpus(" 2 , 3,2") == ("2", "3")
    assert parse_gpus("none") == parse_gpus("") == ()
    assert parse_gpus("GPU-8f1c2d3e") == ("GPU-8f1c2d3e",)
    with pytest.raises(ValueError, match="--gpus takes GPU ids"):
        parse_gpus("0,a b")
    assert parse_memory("1G") == 1 << 30
    assert parse_memory("512M") == parse_memory("512MiB") == 512 << 20
    assert parse_memory("1000") == 1000
    with pytest.raises(ValueError, match="--memory takes bytes"):
        parse_memory("lots")


def test_gpus_are_found_with_nvidia_smi_where_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert detect_gpus() == ()  # no nvidia-smi: none
    smi = tmp_path / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\n"
        "echo 'GPU 0: NVIDIA A100 (UUID: GPU-1)'\n"
        "echo 'GPU 1: NVIDIA A100 (UUID: GPU-2)'\n"
    )
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    assert detect_gpus() == ("0", "1")
    assert Capacity.of_host().gpus == ("0", "1")
    assert Capacity.of_host(gpus=()).gpus == ()  # --gpus none wins
    smi.write_text("#!/bin/sh\nexit 9\n")  # a driver that fails: none
    assert detect_gpus() == ()


def test_the_host_capacity_is_its_cores_and_memory() -> None:
    cap = Capacity.of_host(gpus=())
    assert cap.cpus == len(os.sched_getaffinity(0)) and cap.memory_bytes > 1 << 20
    assert Capacity.of_host(cpus=3.5, memory_bytes=1 << 30, gpus=("7",)) == Capacity(
        3.5, 1 << 30, ("7",)
    )


def test_a_sandbox_sees_only_its_own_gpus() -> None:
    given = with_gpus(SPEC, ("1",), ("0", "1"))
    assert given.env == {"A": "1", "CUDA_VISIBLE_DEVICES": "1", "NVIDIA_VISIBLE_DEVICES": "1"}
    none = with_gpus(SPEC, (), ("0", "1"))  # on a GPU agent, given none: sees none
    assert none.env["CUDA_VISIBLE_DEVICES"] == "" and none.env["NVIDIA_VISIBLE_DEVICES"] == "void"
    assert with_gpus(SPEC, (), ()) is SPEC  # an agent without GPUs changes nothing
    labels = sandbox_labels("sb-1", "a", SPEC, 1.0, ("0", "1"))
    assert labels[LABEL_GPUS] == "0,1"
    assert LABEL_GPUS not in sandbox_labels("sb-1", "a", SPEC, 1.0)


class _Engine:
    def __init__(self, runtimes: dict[str, Any]) -> None:
        self.runtimes = runtimes
        self.asked = 0

    def info(self) -> dict[str, Any]:
        self.asked += 1
        return {"Runtimes": self.runtimes}


def test_a_docker_device_request_only_where_the_engine_has_the_nvidia_runtime() -> None:
    labels = {LABEL_GPUS: "0,3"}
    nvidia = _Engine({"runc": {}, "nvidia": {"path": "nvidia-container-runtime"}})
    (request,) = gpu_requests(nvidia, labels) or []
    assert request["DeviceIDs"] == ["0", "3"] and request["Capabilities"] == [["gpu"]]
    assert gpu_requests(_Engine({"runc": {}}), labels) is None  # env only
    plain = _Engine({"nvidia": {}})
    assert gpu_requests(plain, {}) is None and plain.asked == 0  # no GPUs: no question


def test_on_the_local_runtime_a_gpu_sandbox_gets_its_gpus_device_nodes(tmp_path: Path) -> None:
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm"):
        (tmp_path / name).touch()
    given = with_gpus(SPEC, ("1",), ("0", "1"))
    assert gpu_binds(given, str(tmp_path)) == [
        "--dev-bind", f"{tmp_path}/nvidia1", "/dev/nvidia1",
        "--dev-bind", f"{tmp_path}/nvidiactl", "/dev/nvidiactl",
        "--dev-bind", f"{tmp_path}/nvidia-uvm", "/dev/nvidia-uvm",
    ]  # fmt: skip
    assert gpu_binds(with_gpus(SPEC, (), ("0", "1")), str(tmp_path)) == []  # "void"
    assert gpu_binds(given, str(tmp_path / "none")) == []  # a host without the nodes


def test_bad_resource_options_are_refused_before_sending() -> None:
    from aviato._options import SandboxOptions

    def problems(**kw: Any) -> str:
        return "; ".join(SandboxOptions(image="i", command="c", **kw).problems())

    assert problems(gpus=1, agent_labels={"zone": "a"}, placement="pack") == ""
    assert "gpus must be a whole number" in problems(gpus=-1)
    assert "gpus must be a whole number" in problems(gpus=True)
    assert "gpus must be a whole number" in problems(gpus=1.5)
    assert "placement must be" in problems(placement="tight")
    assert "agent_labels must map" in problems(agent_labels={"": "a"})
    assert "agent_labels must map" in problems(agent_labels={"zone": 1})
    # The scheduler refuses the same from any other sender.
    from scheduler.records import validate_spec

    assert "gpus must be" in (validate_spec(SandboxSpec("i", "c", gpus=-2)) or "")
