"""The import graph of ``ldm/`` (every import statement, function-level ones included, read from the AST):
no cycles, and arrows point down the layers of docs/design.md ("Layers"):

    models -> io -> modules, diffusion -> utils

``modules`` and ``diffusion`` use only ``utils``; ``utils`` uses nothing of ``ldm``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What each layer may import (besides itself).
ALLOWED = {
    "utils": set(),
    "modules": {"utils"},
    "diffusion": {"utils"},
    "io": {"modules", "diffusion", "utils"},
    "models": {"io", "modules", "diffusion", "utils"},
}


def module_files(root: Path) -> dict[str, Path]:
    """``{dotted module name: file}`` for every ``.py`` under ``root/ldm`` (packages by their name)."""
    files = {}
    for path in sorted((root / "ldm").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The ``ldm`` modules ``name`` imports anywhere in its file (relative imports resolved; ``from pkg
    import sub`` counts as importing ``pkg.sub`` when that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            # the deepest known module the target names (``ldm.io.x.func`` -> ``ldm.io.x``)
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    files = module_files(root)
    return {name: imported_modules(name, path, set(files)) for name, path in files.items()}


def layer(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """``"a -> b"`` for every import that goes against the layers (unknown layers are reported too)."""
    bad = []
    for source, targets in graph.items():
        here = layer(source)
        for target in sorted(targets):
            there = layer(target)
            if here is None or there is None or here == there:
                continue
            if here not in ALLOWED or there not in ALLOWED[here]:
                bad.append(f"{source} -> {target}")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan). A package importing its own
    submodules (an ``__init__`` re-exporting them) and a submodule importing its package are not cycles:
    Python imports the package first either way."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def related(a: str, b: str) -> bool:
        return a.startswith(b + ".") or b.startswith(a + ".")

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if related(v, w):
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_ldm_has_no_import_cycles():
    assert cycles(import_graph(ROOT)) == []


def test_ldm_imports_point_down_the_layers():
    graph = import_graph(ROOT)
    assert upward_imports(graph) == []
    io_to_models = [
        f"{s} -> {t}" for s, ts in graph.items() for t in ts if layer(s) == "io" and layer(t) == "models"
    ]
    assert io_to_models == []


def test_the_checker_sees_function_level_cycles_and_upward_imports(tmp_path):
    """The checks above are only worth something if they catch what they forbid."""
    files = {
        "ldm/__init__.py": "",
        "ldm/io/__init__.py": "",
        "ldm/io/a.py": "def f():\n    from ldm.models.m import g\n",
        "ldm/io/b.py": "from ldm.io import c\n",
        "ldm/io/c.py": "def h():\n    from .b import x\n",
        "ldm/models/__init__.py": "",
        "ldm/models/m.py": "import ldm.io.a\n",
        "ldm/utils/__init__.py": "",
        "ldm/utils/u.py": "from ldm.modules.v import y\n",
        "ldm/modules/__init__.py": "",
        "ldm/modules/v.py": "from ldm.utils import u\n",
        "ldm/modules/w/__init__.py": "from ldm.modules.w.x import z\n",
        "ldm/modules/w/x.py": "from ldm.modules import w\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path)
    assert graph["ldm.io.a"] == {"ldm.models.m"}
    assert graph["ldm.io.c"] == {"ldm.io.b"}
    assert sorted(map(tuple, cycles(graph))) == [
        ("ldm.io.a", "ldm.models.m"),
        ("ldm.io.b", "ldm.io.c"),
        ("ldm.modules.v", "ldm.utils.u"),
    ]
    assert upward_imports(graph) == ["ldm.io.a -> ldm.models.m", "ldm.utils.u -> ldm.modules.v"]


ENTRY_SCRIPTS = ("sample", "train")  # command lines at the project root: nothing is built on them


def script_imports(root: Path, folders: tuple[str, ...]) -> list[str]:
    """``"file: sample"`` for every import of an entry script (``import sample``, ``from train import x``,
    function-level ones included) and every ``load_script("sample.py")`` in the ``.py`` files under
    ``folders``."""
    found = []
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name.split(".")[0] for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    names = [node.module.split(".")[0]]
                elif (
                    isinstance(node, ast.Call)
                    and getattr(node.func, "id", None) == "load_script"
                    and node.args
                    and isinstance(node.args[0], ast.Constant)
                ):
                    names = [Path(str(node.args[0].value)).stem]
                found += [f"{path.relative_to(root)}: {n}" for n in names if n in ENTRY_SCRIPTS]
    return found


def test_nothing_is_built_on_the_entry_scripts():
    """The library (ldm), the benchmarks, scripts, callbacks and datamodules use ``ldm`` (sampling:
    ``ldm.models.pipeline``), never ``sample.py`` or ``train.py``; only tests drive the command lines."""
    assert script_imports(ROOT, ("ldm", "benchmarks", "scripts", "callbacks", "datamodules")) == []


def test_the_entry_script_check_sees_every_form(tmp_path):
    (tmp_path / "ldm" / "models").mkdir(parents=True)
    (tmp_path / "ldm" / "models" / "a.py").write_text(
        "import sample\nimport samplers\ndef f():\n    from train import train\n    from .sample import x\n"
    )
    (tmp_path / "ldm" / "models" / "b.py").write_text("m = load_script('sample.py')\n")
    assert script_imports(tmp_path, ("ldm",)) == [
        "ldm/models/a.py: sample",
        "ldm/models/a.py: train",
        "ldm/models/b.py: sample",
    ]
