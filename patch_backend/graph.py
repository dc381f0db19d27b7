"""Exploring names: ``PatchableGraph`` (graphpatch-style wrapper) and the navigable node tree."""

from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import nn

from .index import RootIndex, index_for
from .naming import Site

_PART = re.compile(r"[.|]")


class NodePath:
    """One level of the name hierarchy; ``str(path)`` is the node name to use in a patch map."""

    __slots__ = ("_name", "_children", "_site")

    def __init__(self, name: str) -> None:
        self._name = name
        self._children: Dict[str, NodePath] = {}
        self._site: Optional[Site] = None

    def __getattr__(self, attribute: str) -> "NodePath":
        children = object.__getattribute__(self, "_children")
        if attribute in children:
            return children[attribute]
        raise AttributeError(
            f"{object.__getattribute__(self, '_name') or '<root>'} has no node {attribute!r}; "
            f"children: {', '.join(children) or 'none'}"
        )

    def __getitem__(self, key: str) -> "NodePath":
        return self.__getattr__(key)

    def __dir__(self) -> List[str]:
        return list(self._children) + ["_shape", "_dtype", "_code", "_name"]

    def __str__(self) -> str:
        return self._name

    def __iter__(self):
        return iter(self._children.values())

    @property
    def _shape(self) -> Optional[torch.Size]:
        return torch.Size(self._site.shape) if self._site is not None and self._site.shape is not None else None

    @property
    def _dtype(self) -> Optional[torch.dtype]:
        return self._site.dtype if self._site is not None else None

    @property
    def _code(self) -> str:
        return self._site.code if self._site is not None else ""

    def _label(self) -> str:
        if self._site is not None:
            return "Tensor(" + ", ".join(str(s) for s in self._site.shape) + ")"
        return f"Graph({len(self._children)})"

    def __repr__(self) -> str:
        lines = [f"{self._name.rsplit('.', 1)[-1] if self._name else '<root>'}: {self._label()}"]
        self._draw(lines, "")
        return "\n".join(lines)

    def _draw(self, lines: List[str], indent: str) -> None:
        children = list(self._children.items())
        for position, (key, child) in enumerate(children):
            last = position == len(children) - 1
            lines.append(f"{indent}{'└─' if last else '├─'}{key}: {child._label()}")
            child._draw(lines, indent + ("  " if last else "│ "))


def build_tree(index: RootIndex) -> NodePath:
    root = NodePath("")
    for name in index.names:
        parts = _PART.split(name)
        node = root
        consumed = 0
        for part in parts:
            consumed += len(part)
            if part not in node._children:
                node._children[part] = NodePath(name[:consumed])
            node = node._children[part]
            consumed += 1
        node._site = index.by_name[name][0].site
    return root


class PatchableGraph(nn.Module):
    """Compiles ``module`` with the graphpatch backend and captures it on the example inputs.

    ``PatchableGraph(model, *example_args, **example_kwargs)``; ``_backend`` picks
    ``"graphpatch"`` (default) or ``"graphpatch_eager"``. Calling it runs the compiled model.
    """

    def __init__(self, module: nn.Module, *example_args: Any, _backend: str = "graphpatch", **example_kwargs: Any):
        super().__init__()
        self._module = module
        self._compiled = torch.compile(module, backend=_backend)
        try:
            with torch.no_grad():
                self._compiled(*example_args, **example_kwargs)
        except Exception as error:
            raise ValueError(
                f"PatchableGraph could not capture {type(module).__name__}: the model rejected the example "
                f"inputs ({type(error).__name__}: {error})"
            ) from error
        if not index_for(module).names:
            raise RuntimeError(f"PatchableGraph captured no graph for {type(module).__name__}")

    @property
    def module(self) -> nn.Module:
        return self._module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._compiled(*args, **kwargs)

    @property
    def graph(self) -> NodePath:
        return build_tree(index_for(self._module))

    def patch(self, patch_map: Mapping[Any, Any]):
        from .context import patch

        return patch(self, patch_map)
