"""The structure stays as designed: the layers of LAYERS import only downwards, there are no import
circles (also through ``from PKG import module`` and relative imports), nothing below the console imports
it, and every function and module fits its size (scripts/check_sizes.py)."""
import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from console import ROOT

# Every Python file's layer, lowest first: a file may import its own layer and the ones below, never one
# above. The longest matching prefix of a file's path decides; a file no prefix matches fails the test.
LAYERS = {
    "dihkit/__init__.py": 0,
    "dihkit/foundations/": 1, "KD_Loss.py": 1, "models_repo/": 1,
    "dihkit/sources/": 2, "dihkit/files/": 2, "dataload.py": 2,
    "dihkit/runs/": 3, "dih_utils.py": 3,
    "train_funcs.py": 4,
    "dihkit/methods/": 5, "train_": 5, "CRD/": 5, "TOFD/": 5, "MHKD/": 5,
    "training_types.py": 6,
    "dihkit/console/": 7,
    "dihkit/results/": 8, "report.py": 8,
    # The console and the scripts that call it (the per-method scripts keep the seed's paths).
    "final_test.py": 9, "CRD/train_student.py": 9, "TOFD/tofd_train.py": 9, "MHKD/train_mhkd.py": 9,
    "MHKD/mhkd_training.py": 9, "bench/": 9, "scripts/": 9,
}
# Entry points that may call the console: the per-method scripts, the bench and the helper scripts.
CONSOLE_CALLERS = ("CRD/", "TOFD/", "MHKD/", "bench/", "scripts/")


def modules(root: Path = ROOT) -> dict:
    """Importable module name -> file, for every Python file outside tests/."""
    found = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if rel.parts[0] in ("tests",) or any(p.startswith(".") for p in rel.parts):
            continue
        name = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        found[name] = path
    return found


def imports(name: str, path: Path, known: dict) -> set:
    """The repository modules ``name`` imports: ``import a.b``, ``from a import b`` (module ``a.b`` when it
    is one, else ``a``) and relative imports, resolved against the importing module's package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join([p for p in base if p] + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                if sub in known:
                    out.add(sub)
                elif target in known:
                    out.add(target)
    out.discard(name)
    return out


def layer(path: Path, root: Path = ROOT) -> int:
    """The layer of LAYERS that ``path`` belongs to (longest matching prefix)."""
    rel = path.relative_to(root).as_posix()
    matches = [prefix for prefix in LAYERS if rel.startswith(prefix)]
    assert matches, f"{rel} belongs to no layer: add it to LAYERS in tests/test_structure.py"
    return LAYERS[max(matches, key=len)]


def import_circle(graph: dict):
    """The first import circle in ``graph`` as a list of module names, or None."""
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack + [node, nxt]
            if nxt not in state and (found := visit(nxt, stack + [node])):
                return found
        state[node] = "done"
        return None

    for name in sorted(graph):
        if name not in state and (found := visit(name, [])):
            return found
    return None


def upward_imports(known: dict, graph: dict, root: Path = ROOT) -> list:
    """Every ``(importer, imported)`` pair where a lower layer imports a higher one."""
    return [(a, b) for a in sorted(graph) for b in sorted(graph[a])
            if layer(known[b], root) > layer(known[a], root)]


def analyse(root: Path = ROOT):
    """(modules, import graph) of the tree at ``root``."""
    known = modules(root)
    return known, {name: imports(name, path, known) for name, path in known.items()}


def test_no_import_circles_and_nothing_below_the_console_imports_it():
    known, graph = analyse()
    for name, path in known.items():
        if "final_test" in graph[name]:
            assert str(path.relative_to(ROOT)).startswith(CONSOLE_CALLERS), f"{name} imports the console"
    assert import_circle(graph) is None, "import circle: " + " -> ".join(import_circle(graph))


def test_every_layer_imports_only_downwards():
    known, graph = analyse()
    assert upward_imports(known, graph) == []


def test_the_root_keeps_the_seeds_face():
    """The root holds the seed's files, the training types and the console; the machinery lives below."""
    root_files = sorted(p.name for p in ROOT.glob("*.py"))
    assert len(root_files) <= 20, root_files
    assert {"final_test.py", "train_funcs.py", "KD_Loss.py", "dih_utils.py", "dataload.py"} <= set(root_files)


def test_the_resolver_sees_package_and_relative_imports(tmp_path):
    """``from CRD import crd`` is an edge to CRD.crd; ``from . import x`` and ``from .x import y`` resolve."""
    known = {"CRD": None, "CRD.crd": None, "dihkit.runs": None, "dihkit.runs.run_state": None,
             "dihkit.runs.evaluation": None, "dihkit.files.checkpoints": None}
    path = tmp_path / "seeds.py"
    path.write_text("from CRD import crd\nfrom . import run_state\nfrom .evaluation import evaluate\n"
                    "from ..files.checkpoints import save\n")
    assert imports("dihkit.runs.seeds", path, known) == {"CRD.crd", "dihkit.runs.run_state",
                                                         "dihkit.runs.evaluation", "dihkit.files.checkpoints"}


@pytest.fixture
def tree_copy(tmp_path):
    """A copy of the repository's Python files, for planting faults."""
    for path in modules().values():
        dest = tmp_path / path.relative_to(ROOT)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dest)
    return tmp_path


def test_a_planted_circle_through_a_package_import_is_caught(tree_copy):
    """CRD.crd importing the registry list, which imports ``from CRD import crd``: a real circle."""
    crd = tree_copy / "CRD" / "crd.py"
    crd.write_text("import training_types\n" + crd.read_text())
    circle = import_circle(analyse(tree_copy)[1])
    assert circle and "CRD.crd" in circle and "training_types" in circle


def test_a_planted_relative_circle_is_caught(tree_copy):
    run_state = tree_copy / "dihkit" / "runs" / "run_state.py"
    context = tree_copy / "dihkit" / "runs" / "run_context.py"
    run_state.write_text("from .run_context import RunContext\n" + run_state.read_text())
    context.write_text("from . import run_state\n" + context.read_text())
    circle = import_circle(analyse(tree_copy)[1])
    assert circle and {"dihkit.runs.run_state", "dihkit.runs.run_context"} <= set(circle)


def test_a_planted_upward_import_is_caught(tree_copy):
    """The data sources importing the run machinery break the layers."""
    batches = tree_copy / "dihkit" / "sources" / "batches.py"
    batches.write_text("from dihkit.runs import evaluation\n" + batches.read_text())
    known, graph = analyse(tree_copy)
    assert upward_imports(known, graph, tree_copy) == [("dihkit.sources.batches", "dihkit.runs.evaluation")]


def check_sizes(root: Path) -> subprocess.CompletedProcess:
    """scripts/check_sizes.py of the tree at ``root``, run on that tree."""
    return subprocess.run([sys.executable, str(root / "scripts" / "check_sizes.py")], capture_output=True, text=True)


def test_functions_and_modules_fit_their_size():
    done = check_sizes(ROOT)
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_a_planted_long_function_and_long_module_are_reported(tree_copy):
    """A 61-line function in a module of its own, and a 401-line module of short lines: each named with its size."""
    body = "".join(f"    x{i} = {i}\n" for i in range(59))
    (tree_copy / "dihkit" / "long_function.py").write_text(f"def too_long():\n{body}    return 0\n")
    (tree_copy / "dihkit" / "long_module.py").write_text("".join(f"X{i} = {i}\n" for i in range(401)))
    done = check_sizes(tree_copy)
    assert done.returncode == 1
    assert done.stderr.splitlines() == ["over the limit: dihkit/long_function.py:too_long (61 lines)",
                                        "over the limit: dihkit/long_module.py (401 lines)"]
    assert "     61  dihkit/long_function.py:too_long" in done.stdout.splitlines()
    assert "    401  dihkit/long_module.py" in done.stdout.splitlines()
