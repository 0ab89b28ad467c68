"""The shape of the code (docs/architecture.md): imports run one way, no import cycles, small files,
and the edge (server/edge/) apart from the engine and the model: it imports no torch.

Read from the source with `ast`, lazy (function-level) imports included: a cycle hidden in a
function is still a cycle a reader has to untangle. `importlib.import_module("name")` and
`__import__("name")` with a constant name count as imports too.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = {"lcmserve": REPO / "client", "lcmserve.server": REPO / "server", "lcmserve.export": REPO / "export"}
GENERATED = REPO / "client" / "v1"
MAX_LINES = 500
EDGE = "lcmserve.server.edge"
# What the edge may import of the server package besides itself: the pipe's messages, the
# configuration, CPU placement, logging (both processes'). Not the engine, not the model (they import torch).
EDGE_MAY_IMPORT = {"lcmserve.server", "lcmserve.server.protocol", "lcmserve.server.config",
                   "lcmserve.server.placement", "lcmserve.server.logs"}
# Imports against the one-way rule that are documented and loaded by name only when asked for:
# `lcmserve bench --baseline` runs diffusers in the bench process (the server extra).
OPTIONAL_IMPORTS = {"lcmserve.bench.baseline": {"lcmserve.export.loading", "lcmserve.server.placement"}}


def _modules() -> dict[str, pathlib.Path]:
    found: dict[str, pathlib.Path] = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            if GENERATED in path.parents:
                continue
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def _imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """The project modules `name` imports (`from .x import y` resolved; `y` counted when it is a module)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            candidates = [module] + [f"{module}.{alias.name}" for alias in node.names]
        elif (dynamic := _imported_by_name(node)) is not None:
            level = len(dynamic) - len(dynamic.lstrip("."))
            if level:  # import_module(".x", package=__package__): relative to this module's package
                base = package.split(".")
                base = base[: len(base) - (level - 1)]
                dynamic = ".".join([*base, dynamic[level:]] if dynamic[level:] else base)
            candidates = [dynamic]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in known:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
    return targets


def _imported_by_name(node: ast.AST) -> str | None:
    """The module named by `importlib.import_module("name")`, `import_module("name")` or
    `__import__("name")` with a constant name; None for any other node."""
    if not isinstance(node, ast.Call) or not node.args:
        return None
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    first = node.args[0]
    if name in ("import_module", "__import__") and isinstance(first, ast.Constant) and isinstance(first.value, str):
        return first.value
    return None


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _package_of(module: str) -> str:
    for package in ("lcmserve.server", "lcmserve.export"):
        if module == package or module.startswith(package + "."):
            return package
    return "lcmserve"


def test_imports_run_one_way() -> None:
    wrong = [f"{source} imports {target}" for source, targets in _graph().items() for target in targets
             if (_package_of(source), _package_of(target)) in {("lcmserve.export", "lcmserve.server"),
                                                                 ("lcmserve", "lcmserve.server"),
                                                                 ("lcmserve", "lcmserve.export")}
             and target not in OPTIONAL_IMPORTS.get(source, set())]
    assert not wrong, "imports must run server -> export, and the client imports neither:\n" + "\n".join(wrong)


def test_no_import_cycles() -> None:
    modules = _modules()
    graph = _graph()
    # Edges within a package only (`lcmserve.server.x` importing `lcmserve.names` is the one-way use of
    # the client's enum names), and not into a package's __init__: re-exports are not a module's cycle.
    inner = {name: {t for t in targets if _package_of(t) == _package_of(name) and modules[t].name != "__init__.py"}
             for name, targets in graph.items()}
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in path:
            raise AssertionError(f"import cycle: {' -> '.join((*path[path.index(name):], name))}")
        if name not in done:
            for target in sorted(inner[name]):
                visit(target, (*path, name))
            done.add(name)

    for name in sorted(inner):
        visit(name, ())


def test_no_hand_written_file_is_too_long() -> None:
    long = []
    for folder in (*PACKAGES.values(), REPO / "scripts", REPO / "tests"):
        for path in folder.rglob("*.py"):
            if GENERATED in path.parents:
                continue
            lines = len(path.read_text().splitlines())
            if lines > MAX_LINES:
                long.append(f"{path.relative_to(REPO)}: {lines} lines")
    assert not long, f"over {MAX_LINES} lines (split by concern):\n" + "\n".join(long)


# ---- the edge (server/edge/) ----------------------------------------------------------------------


def _in_edge(module: str) -> bool:
    return module == EDGE or module.startswith(EDGE + ".")


def test_the_edge_imports_only_the_protocol_config_and_placement_of_the_server() -> None:
    wrong = [f"{source} imports {target}" for source, targets in _graph().items() if _in_edge(source)
             for target in targets if _package_of(target) == "lcmserve.server" and not _in_edge(target)
             and target not in EDGE_MAY_IMPORT]
    assert not wrong, ("the edge imports of the server package only " + ", ".join(sorted(EDGE_MAY_IMPORT))
                       + " (the engine and the model come in by injection: server/launch.py):\n" + "\n".join(wrong))


def test_the_layout_rules_see_modules_loaded_by_name() -> None:
    tree = ast.parse('import importlib\nimportlib.import_module("lcmserve.export.loading")\n'
                     '__import__("lcmserve.server.engine.main")\nimport_module(".work", __package__)\n'
                     'importlib.import_module(name)\n')
    found = [name for node in ast.walk(tree) if (name := _imported_by_name(node)) is not None]
    assert sorted(found) == [".work", "lcmserve.export.loading", "lcmserve.server.engine.main"]


def test_importing_the_edge_loads_no_torch() -> None:
    """Every module of server/edge/ imported in a fresh interpreter: neither torch nor diffusers
    (nor the engine or the model) comes with it, so the edge starts in a second and a port in use
    is reported at once. The serve CLI and the composition root (server/launch.py) likewise."""
    edge = sorted(name for name in _modules() if _in_edge(name))
    assert len(edge) > 5, edge
    code = ("import sys\n"
            f"for name in {[*edge, 'lcmserve.server.launch', 'lcmserve.server.cli']!r}:\n"
            "    __import__(name)\n"
            "heavy = ('torch', 'diffusers', 'lcmserve.server.engine', 'lcmserve.server.model')\n"
            "print(sorted(m for m in sys.modules if m.startswith(heavy)))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
