"""How the code is layered: engine/ is the core, adapters/ plug into it, the CLI and the HTTP API are
front-ends over both. Read from the source (every import statement, function-level ones included), so a
new import that breaks the layering fails here rather than as an ImportError at some user's start-up."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "adapters")
FRONT_ENDS = ("engine.cli", "engine.api")
# The one place of the core that names concrete adapters: it builds the Engine's default adapter set.
COMPOSITION = {"engine.compose"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")}


def imported(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `module` imports anywhere in its source (a package's own parents left out)."""
    found = set()
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != module and not module.startswith(target + "."):
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {module: imported(module, path, known) for module, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def is_front_end(module: str) -> bool:
    return any(module == f or module.startswith(f + ".") for f in FRONT_ENDS)


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_core_names_no_concrete_adapter_outside_the_composition_place():
    offenders = {
        module: sorted(target for target in targets if target.startswith("adapters"))
        for module, targets in import_graph().items()
        if module.startswith("engine") and not is_front_end(module) and module not in COMPOSITION
    }
    assert {module: targets for module, targets in offenders.items() if targets} == {}


def test_adapters_never_import_a_front_end():
    offenders = {module: sorted(filter(is_front_end, targets))
                 for module, targets in import_graph().items() if module.startswith("adapters")}
    assert {module: targets for module, targets in offenders.items() if targets} == {}


def test_the_graph_reader_sees_a_cycle_when_there_is_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_starting_the_http_api_loads_neither_torch_nor_opencv(tmp_path):
    """`refgen serve` answers requests at once; torch, diffusers and OpenCV load with the first job."""
    script = (
        "import sys\n"
        "from engine.api.server import service\n"
        "from engine.api.store import AssetStore\n"
        f"with AssetStore({str(tmp_path)!r}) as store:\n"
        "    service(store, model='tiny')\n"
        "print(sorted(m for m in ('torch', 'cv2', 'diffusers', 'transformers', 'controlnet_aux') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "[]"
