"""The torch version the fences are gated on, and the one way a fallback is announced.

A gate compares ``TORCH_VERSION`` where torch's behaviour is known to differ by release, and
probes (a ``_probe_*`` function per gate, returning the API or None) where an API may be missing;
the probes are separate functions so a test can simulate an old torch without patching torch.
Whenever a fallback path runs, ``fallback`` warns once per gate with ``PatchBackendWarning`` and
logs every occurrence at DEBUG: a fallback never changes names or compile counts silently.
"""

from __future__ import annotations

import logging
import threading
import warnings
from typing import Any, Set

import torch
from torch.torch_version import TorchVersion

from ..errors import PatchBackendWarning

logger = logging.getLogger(__name__)

#: The running torch, comparable with strings and tuples (``TORCH_VERSION >= (2, 13)``). Typed Any:
#: TorchVersion compares with tuples at runtime, but its annotations declare str comparisons only.
TORCH_VERSION: Any = TorchVersion(torch.__version__)
#: Releases the test suite runs against: [first, last) (setup.cfg bounds install_requires to it).
TESTED_FROM, TESTED_BEFORE = (2, 10), (2, 14)

_warned: Set[str] = set()
_lock = threading.Lock()


def fallback(gate: str, message: str) -> None:
    """Announces that ``gate`` took its fallback: a PatchBackendWarning the first time, a DEBUG
    log record every time (the warning filter's own "once" would not survive pytest's
    ``catch_warnings``, so the once is kept here)."""
    logger.debug("fallback %s: %s", gate, message)
    with _lock:
        if gate in _warned:
            return
        _warned.add(gate)
    warnings.warn(f"patch_backend ({gate}, torch {torch.__version__}): {message}", PatchBackendWarning, stacklevel=3)


def reset_warnings() -> None:
    """Forgets which gates have warned (tests)."""
    with _lock:
        _warned.clear()


def in_tested_range() -> bool:
    return TESTED_FROM <= TORCH_VERSION < TESTED_BEFORE
