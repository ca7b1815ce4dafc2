"""The structure stays as designed: no import circles, nothing below the console imports it, and every
function and module fits its size (scripts/check_sizes.py)."""
import ast
import subprocess
import sys
from pathlib import Path

from console import ROOT

# Entry points that may call the console: the per-method scripts, the bench and the helper scripts.
CONSOLE_CALLERS = ("CRD/", "TOFD/", "MHKD/", "bench/", "scripts/")


def modules() -> dict:
    """Importable module name -> file, for every Python file outside tests/."""
    found = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests",) or any(p.startswith(".") for p in rel.parts):
            continue
        name = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        found[name] = path
    return found


def imports(name: str, path: Path, known: dict) -> set:
    """The repository modules ``name`` imports."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module:
            target = (name.rsplit(".", 1)[0] + "." + node.module) if node.level else node.module
            if target in known:
                out.add(target)
    return out


def test_no_import_circles_and_nothing_below_the_console_imports_it():
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    for name, path in known.items():
        if "final_test" in graph[name]:
            assert str(path.relative_to(ROOT)).startswith(CONSOLE_CALLERS), f"{name} imports the console"
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in graph[node]:
            assert state.get(nxt) != "open", "import circle: " + " -> ".join(stack + [node, nxt])
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = "done"

    for name in graph:
        if name not in state:
            visit(name, [])


def test_functions_and_modules_fit_their_size():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_sizes.py")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
