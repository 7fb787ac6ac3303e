"""The labels every sandbox carries (Docker labels, or the local runtime's record of
them), and the spec written to and read from them: an agent finds its own sandboxes
after a restart, and reports them to a scheduler that restarted."""

from __future__ import annotations

import json
from collections.abc import Mapping

from aviato.protocol import SandboxSpec, from_wire, to_wire

__all__ = [
    "LABEL_AGENT",
    "LABEL_CREATED",
    "LABEL_GPUS",
    "LABEL_MANAGED",
    "LABEL_SANDBOX",
    "LABEL_SESSION",
    "LABEL_SPARE",
    "LABEL_SPEC",
    "sandbox_labels",
    "spec_from_labels",
]

LABEL_MANAGED = "aviato.managed"
LABEL_SANDBOX = "aviato.sandbox"
LABEL_AGENT = "aviato.agent"
LABEL_SESSION = "aviato.session"
LABEL_SPEC = "aviato.spec"
LABEL_CREATED = "aviato.created"
#: On a pre-started spare: its sandbox label is the spare's own id until it is claimed
#: (labels are fixed at create: the claim is recorded beside the agent, see
#: agent/runtime/spare_claims.py, and its labels are rewritten when listed).
LABEL_SPARE = "aviato.spare"
#: The GPU ids the scheduler gave the sandbox, comma-separated (absent: none; see
#: agent/resources.py).
LABEL_GPUS = "aviato.gpus"


def sandbox_labels(
    sandbox_id: str,
    agent_id: str,
    spec: SandboxSpec,
    created_at: float,
    gpu_ids: tuple[str, ...] = (),
) -> dict[str, str]:
    gpus = {LABEL_GPUS: ",".join(gpu_ids)} if gpu_ids else {}
    return {
        **gpus,
        LABEL_MANAGED: "1",
        LABEL_SANDBOX: sandbox_id,
        LABEL_AGENT: agent_id,
        LABEL_SESSION: spec.session_id or "",
        LABEL_SPEC: json.dumps(to_wire(spec), separators=(",", ":")),
        LABEL_CREATED: repr(created_at),
    }


def spec_from_labels(labels: Mapping[str, str]) -> SandboxSpec | None:
    """The spec a sandbox was created with, or None when its labels are not ours."""
    try:
        spec: SandboxSpec = from_wire(SandboxSpec, json.loads(labels[LABEL_SPEC]), "spec")
        return spec
    except Exception:
        return None
