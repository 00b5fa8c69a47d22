"""The import graph of ``opd`` between its layers (``opd.rollout``, ``opd.teacher``, ``opd.cluster``, ...) has
no cycles, counting imports inside functions (those still tie the layers) and skipping ``TYPE_CHECKING``
blocks."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# none left; a cycle that must stay for a while is listed here with its reason
KNOWN: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    out = {}
    for path in (ROOT / "opd").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target.startswith("opd") and target != name:
                found.add(target)
    return found


def _layer(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_no_import_cycles_between_layers():
    modules = _modules()
    edges = {(_layer(a), _layer(b)) for a, path in modules.items() for b in _imports(a, path, modules)
             if _layer(a) != _layer(b)}
    reach = {a: {b for x, b in edges if x == a} for a, _ in edges}
    changed = True
    while changed:  # transitive closure: small graph
        changed = False
        for seen in reach.values():
            more = set().union(*(reach.get(b, set()) for b in seen)) - seen
            if more:
                seen |= more
                changed = True
    cycles = {tuple(sorted((a, b))) for a in reach for b in reach[a] if a != b and a in reach.get(b, set())}
    assert cycles <= KNOWN, f"import cycles between layers: {sorted(cycles - KNOWN)}"
    assert KNOWN <= cycles, f"{sorted(KNOWN - cycles)} no longer form a cycle: drop them from KNOWN"


# Strings equal to an objective's name that are something else: the project's own name (also the native
# teacher.protocol) and a metric's.
NOT_OBJECTIVES = {("opd/cli.py", "opd"), ("opd/config_sections.py", "opd"),
                  ("opd/monitor/console.py", "opd"),
                  ("opd/monitor/grafana.py", "opd"), ("opd/monitor/grafana.py", "opd_reward"),
                  ("opd/monitor/ray_metrics.py", "opd_reward"),
                  ("opd/preflight.py", "opd")}


def test_no_module_outside_the_objectives_names_an_objective():
    """Each objective declares what the rest of opd asks of it (``opd.trainer.objectives``): no other module
    compares with, keys on or reads a section by an objective's name."""
    from opd.trainer.objectives import REGISTRY

    found = []
    for path in sorted((ROOT / "opd").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("opd/trainer/objectives/"):
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(n.value) for n in ast.walk(tree)
                      if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in REGISTRY and id(node) not in docstrings:
                if (rel, node.value) not in NOT_OBJECTIVES:
                    found.append(f"{rel}:{node.lineno}: {node.value!r}")
            elif isinstance(node, ast.Attribute) and node.attr in REGISTRY:
                found.append(f"{rel}:{node.lineno}: .{node.attr}")
    assert not found, "objective names outside opd/trainer/objectives:\n" + "\n".join(found)


def test_the_roles_import_nothing_above_them():
    """Roles (rollout, teacher, trainer, rewards) reach metrics through ``opd.metrics``, below them;
    ``opd.monitor`` (the driver's sinks, reports, the Grafana board) and the config sit above. The objectives'
    declarations import without torch (``opd.config`` validates against them)."""
    modules = _modules()
    roles = ("opd.rollout", "opd.teacher", "opd.trainer", "opd.rewards")
    above = ("opd.monitor", "opd.config", "opd.driver", "opd.cluster", "opd.steps")
    up = sorted(f"{a} -> {b}" for a, path in modules.items() if a.startswith(roles)
                for b in _imports(a, path, modules) if b.startswith(above))
    assert not up, f"roles importing layers above them: {up}"
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c",
                          "import sys, opd.config, opd.trainer.objectives.spec; "
                          "print('torch' in sys.modules)"],
                         capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"
