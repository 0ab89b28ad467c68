"""The shape of the code (docs/architecture.md): imports run one way, no import cycles, small files.

Read from the source with `ast`, lazy (function-level) imports included: a cycle hidden in a
function is still a cycle a reader has to untangle.
"""

from __future__ import annotations

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = {"lcmserve": REPO / "client", "lcmserve.server": REPO / "server", "lcmserve.export": REPO / "export"}
GENERATED = REPO / "client" / "v1"
MAX_LINES = 500


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
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in known:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
    return targets


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
                                                                 ("lcmserve", "lcmserve.export")}]
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
