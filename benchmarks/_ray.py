"""Ray as every benchmark starts its peer: two CPUs like this machine, quiet, shut down
at the end whatever happens."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import sys
from collections.abc import Iterator
from typing import Any


def ray_missing(notes: list[str], hint: str) -> bool:
    """Whether Ray is not installed (then ``hint`` joins ``notes``)."""
    if importlib.util.find_spec("ray") is None:
        notes.append(hint)
        return True
    return False


@contextlib.contextmanager
def ray_started(by_value: str | None = None) -> Iterator[Any]:
    """``ray``, initialised. ``by_value``: a module Ray's workers get pickled by value
    (the script's ``__main__``: they need not import this checkout)."""
    import ray
    import ray.cloudpickle

    if by_value is not None:
        ray.cloudpickle.register_pickle_by_value(sys.modules[by_value])  # type: ignore[no-untyped-call]
    ray.init(num_cpus=2, logging_level=logging.ERROR)
    try:
        yield ray
    finally:
        ray.shutdown()
