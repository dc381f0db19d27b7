"""Compiled artifacts that outlive the process: ``pb.save_cache(path)`` / ``pb.load_cache(path)``.

Every compile of this package (plain graphs, patched variants, regions) goes through Inductor
with its FX graph cache and AOTAutograd cache enabled and keyed deterministically
(``_torch_compat/inductor.py``), so a second process on the same machine already finds them in
``TORCHINDUCTOR_CACHE_DIR``. These two functions carry the same artifacts to another machine of
the same kind (same torch version, same device type) or a fresh cache directory, through
``torch.compiler.save_cache_artifacts`` / ``load_cache_artifacts``: the loading process then
compiles (nearly) nothing for the same model and patch structures. They are the successor of
graphpatch's ``pg.save`` (docs/porting.md).

The file is a short header (magic line, then one JSON line naming the torch version and what it
holds) followed by torch's serialized artifacts, so a file from another torch version or a
damaged file is refused with a clear error instead of silently missing every cache.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, Union

import torch

_MAGIC = b"patch_backend compile cache v1\n"

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class CacheFile:
    """What a saved or loaded cache file holds."""

    path: str
    #: Bytes of torch's serialized artifacts (header excluded).
    size: int
    #: Artifact kind (``inductor``, ``aot_autograd``, ``autotune``, ...) → how many.
    artifacts: Dict[str, int]
    torch_version: str


def _counts(info: object) -> Dict[str, int]:
    artifacts = getattr(info, "artifacts", None) or {}
    return {str(kind): len(keys) for kind, keys in artifacts.items()}


def save_cache(path: PathLike) -> CacheFile:
    """Writes the compiled artifacts this process created or loaded to ``path``.

    Raises RuntimeError when the process compiled nothing that torch can serialize (call it
    after the compiled model has run, with and without the patch structures to keep).
    """
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        raise RuntimeError(
            f"pb.save_cache({os.fspath(path)!r}): this process has no compiled artifacts to save; run the "
            "compiled model (and the patch structures to keep) first, with torch's FX graph cache enabled "
            "(torch._inductor.config.fx_graph_cache, on by default)"
        )
    payload, info = saved
    counts = _counts(info)
    header = json.dumps({"torch": torch.__version__, "artifacts": counts}).encode() + b"\n"
    target = os.fspath(path)
    temporary = f"{target}.tmp{os.getpid()}"
    with open(temporary, "wb") as handle:
        handle.write(_MAGIC + header + payload)
    os.replace(temporary, target)  # never leaves a half-written file under the real name
    return CacheFile(target, len(payload), counts, torch.__version__)


def load_cache(path: PathLike) -> CacheFile:
    """Loads artifacts written by ``save_cache`` into torch's caches of this process.

    Call it before the first compiled call. Raises FileNotFoundError for a missing file and
    ValueError for a file that is not a cache of this package, was written by another torch
    version, or is damaged.
    """
    source = os.fspath(path)
    if not os.path.exists(source):
        raise FileNotFoundError(f"pb.load_cache: no cache file at {source!r} (write one with pb.save_cache(path))")
    with open(source, "rb") as handle:
        data = handle.read()
    if not data.startswith(_MAGIC):
        raise ValueError(f"pb.load_cache: {source!r} is not a patch_backend cache file (written by pb.save_cache)")
    header_end = data.find(b"\n", len(_MAGIC))
    try:
        header = json.loads(data[len(_MAGIC):header_end])
        version = header["torch"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"pb.load_cache: {source!r} has a damaged header ({error})") from None
    if version != torch.__version__:
        raise ValueError(
            f"pb.load_cache: {source!r} was written by torch {version}, this is torch {torch.__version__}; "
            "compiled artifacts only load into the torch version that wrote them"
        )
    payload = data[header_end + 1:]
    try:
        info = torch.compiler.load_cache_artifacts(payload)
    except Exception as error:  # noqa: BLE001 - torch raises various errors for damaged bytes
        raise ValueError(f"pb.load_cache: {source!r} is damaged: {type(error).__name__}: {error}") from error
    if info is None:
        raise ValueError(f"pb.load_cache: {source!r} holds no artifacts torch could read")
    return CacheFile(source, len(payload), _counts(info), version)
