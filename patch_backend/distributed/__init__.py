"""Sharded sweeps over torch.distributed ranks (see ``sharded``)."""

from .sharded import *  # noqa: F401,F403
from .sharded import (  # noqa: F401
    _Agreement, _HEADER_BYTES, _fingerprint,
)
