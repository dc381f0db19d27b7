"""The package's import structure: no cycles, no imports hidden inside functions.

Late imports are how cycles get dodged; once there are none, a module's top lines say
everything it depends on. Optional dependencies (matplotlib, transformers, ...) are the only
exception: importing them lazily keeps ``import patch_backend`` light.
"""

from __future__ import annotations

import ast
import pathlib
from typing import Dict, List, Set

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "patch_backend"
#: Imported inside functions on purpose: optional dependencies, only for the feature that needs them.
OPTIONAL = {"matplotlib", "transformers", "transformer_lens"}
#: Private torch is imported inside _torch_compat's probes: a symbol missing from a torch release
#: is the probe's cue to take its fallback (with a PatchBackendWarning), not an import error of
#: the whole package.
PROBES = "patch_backend._torch_compat."


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> List[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        parts = module.split(".")
        keep = len(parts) - node.level + (1 if is_package else 0)
        base = ".".join(parts[:keep] + ([node.module] if node.module else []))
    if node.module is None:
        return [f"{base}.{alias.name}" for alias in node.names]
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def _imports(path: pathlib.Path):
    module = _module_name(path)
    tree = ast.parse(path.read_text())
    top: Set[str] = set()
    late: List[str] = []
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for inner in ast.walk(node)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue  # imports for annotations only: never executed, so never a cycle
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else _resolve(module, path.name == "__init__.py", node)
            )
            if node.col_offset == 0:
                top.update(names)
            else:
                late.extend(f"{module}:{node.lineno} {name}" for name in names[:1])
    return module, top, late


def _graph():
    modules = {}
    late_all = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module, top, late = _imports(path)
        modules[module] = top
        late_all.extend(late)
    known = set(modules)
    edges = {m: {t for t in targets if t in known and t != m} for m, targets in modules.items()}
    return edges, late_all


def _cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    edges, _ = _graph()
    # A package's __init__ re-exports its modules; an edge into it from a submodule is a cycle
    # only if that submodule is among what it re-exports, which the SCCs show directly.
    assert _cycles(edges) == []


def test_no_late_imports_but_optional_dependencies():
    _, late = _graph()
    hidden = [
        entry
        for entry in late
        if entry.split(" ")[1].split(".")[0] not in OPTIONAL
        and not (entry.startswith(PROBES) and entry.split(" ")[1].startswith("torch."))
    ]
    assert hidden == []
