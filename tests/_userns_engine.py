"""A second Docker engine with ``--userns-remap``, for the tests (a pytest plugin,
loaded by tests/conftest.py): root inside its containers is an unprivileged uid on the
host.

Like tests/_gvisor_engine.py's (whose engine it extends), the host's engine is never
touched. The remapping needs a user of its own and its ranges in /etc/subuid and
/etc/subgid: the engine adds a dedicated system user and one line to each file, and
takes away exactly those at the end (other lines of the files are left as they were).

Skips without dockerd or useradd, unless AVIATO_REQUIRE_USERNS=1.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._gvisor_engine import GvisorEngine

REQUIRE = os.environ.get("AVIATO_REQUIRE_USERNS") == "1"
SUBID_FILES = (Path("/etc/subuid"), Path("/etc/subgid"))
#: How many ids the remapped range holds (what dockerd's own ``default`` user gets).
SPAN = 65536


def userns_problem() -> str | None:
    """Why no remapping engine can be started here (None: one can)."""
    if not shutil.which("dockerd"):
        return "dockerd is not installed"
    if not (shutil.which("useradd") and shutil.which("userdel")):
        return "useradd/userdel are not installed (passwd)"
    if os.geteuid() != 0:
        return "starting a second dockerd and adding its remap user needs root"
    return None


class UsernsEngine(GvisorEngine):
    """One dockerd of our own remapping its containers' root to ``base`` on the host."""

    def __init__(self) -> None:
        super().__init__()
        self.user = f"avremap-{uuid.uuid4().hex[:8]}"
        # Above the local runtime's test uids (tests/test_userns.py, test_hostile.py).
        self.base = 3_000_000 + random.randrange(1000) * SPAN
        self.extra_args = ("--userns-remap", self.user)
        self._added_user = False

    def start(self) -> None:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
             self.user],
            check=True, capture_output=True,
        )  # fmt: skip
        self._added_user = True
        for path in SUBID_FILES:
            before = path.read_text() if path.exists() else ""
            with path.open("a") as f:  # on a line of its own, whatever the file ended with
                f.write(
                    ("\n" if before and not before.endswith("\n") else "")
                    + f"{self.user}:{self.base}:{SPAN}\n"
                )
        # The remapped root must pass through the data root's parents (mkdtemp's 0700).
        self.root.chmod(0o711)
        super().start()

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            for path in SUBID_FILES:
                if path.exists():
                    kept = [
                        line
                        for line in path.read_text().splitlines(keepends=True)
                        if not line.startswith(f"{self.user}:")
                    ]
                    path.write_text("".join(kept))
            if self._added_user:
                subprocess.run(["userdel", self.user], capture_output=True, check=False)


@pytest.fixture(scope="session")
def userns_engine() -> Iterator[UsernsEngine]:
    problem = userns_problem()
    if problem:
        if REQUIRE:
            pytest.fail(f"{problem} (AVIATO_REQUIRE_USERNS=1)")
        pytest.skip(problem)
    engine = UsernsEngine()
    try:
        engine.start()
        yield engine
        left = engine.containers()
        assert not left, f"containers leaked in the userns engine: {left}"
    finally:
        engine.stop()
    assert not engine.root.exists(), f"{engine.root} was left behind"
    assert engine.user not in Path("/etc/subuid").read_text(), "/etc/subuid kept our line"
