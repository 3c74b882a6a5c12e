"""The package's import graph, read statically from every module: the layers and the arrows
between them (docs/architecture.md), no cycle between subpackages and no arrow back up."""

from __future__ import annotations

import ast
import collections
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "lm_eval_telltale"

#: each part of the package and the parts it may import (its own modules always)
ALLOWED = {
    "spec": set(),
    "files": set(),
    "cmdline": set(),                                        # what the lm_eval command line says
    "core": {"spec"},
    "sidecar": {"core", "files"},
    "config": {"(pkg)", "core", "sidecar", "spec"},
    "vllm": {"config", "core", "sidecar", "spec"},           # the vLLM adapter
    "hf": {"core"},                                          # the transformers adapter
    "tasksupport": {"cmdline", "config", "spec"},
    "harness": {"cmdline", "config", "core", "hf", "sidecar", "spec", "vllm"},  # the lm-eval model types
    "arith": {"spec", "tasksupport"},
    "tools": {"(pkg)", "arith", "cmdline", "config", "core", "files", "harness", "hf", "sidecar", "spec", "tasksupport",
              "vllm"},
    "cli": {"_lmeval_hook", "files", "tools"},
    "_lmeval_hook": {"(pkg)"},
    "__main__": {"cli"},
    "(pkg)": {"spec"},
}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "(pkg)"


def import_graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = collections.defaultdict(set)
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        module = ".".join(parts)
        here = parts if path.name == "__init__.py" else parts[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = here[: len(here) - (node.level - 1)] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                # "from .. import cmdline": a module imported by name from the package is that part
                subs = [a.name for a in node.names if (PKG / f"{a.name}.py").is_file() or (PKG / a.name).is_dir()]
                targets += [f"{target}.{s}" for s in subs] if target == "lm_eval_telltale" and subs else [target]
            elif isinstance(node, ast.Import):
                targets += [a.name for a in node.names]
            for t in targets:
                if t.split(".")[0] == "lm_eval_telltale" and _part(t) != _part(module):
                    edges[_part(module)].add(_part(t))
    return edges


def test_every_arrow_is_allowed():
    graph = import_graph()
    assert set(graph) <= set(ALLOWED), f"a new part of the package: {set(graph) - set(ALLOWED)}"
    wrong = {part: sorted(targets - ALLOWED[part]) for part, targets in graph.items() if targets - ALLOWED[part]}
    assert not wrong, f"arrows against the layers: {wrong}"


def test_no_cycle_between_parts():
    graph = import_graph()
    seen, stack = set(), []

    def visit(n):
        if n in stack:
            raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(n):] + [n])}")
        if n in seen:
            return
        stack.append(n)
        for m in graph.get(n, ()):
            visit(m)
        stack.pop()
        seen.add(n)

    for n in list(graph):
        visit(n)
