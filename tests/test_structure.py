"""The structure stays as designed: the layers of LAYERS import only downwards, there are no import
circles (also through ``from PKG import module`` and relative imports), nothing below the console imports
it, every file is written through the one atomic writer (``dihkit/files/atomic_files.py``), and every
function and module fits its size (scripts/check_sizes.py)."""
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


# ----------------------------------------------------------------------------- one writer

WRITER = "dihkit/files/atomic_files.py"
# Methods and functions that write a file: Path.write_text/write_bytes/touch, matplotlib's savefig, torch.save,
# numpy's save/savez/savetxt, json/pickle.dump, pandas' to_csv, tofile, archive extraction.
WRITE_CALLS = {"write_text", "write_bytes", "touch", "savefig", "save", "savez", "savez_compressed", "savetxt",
               "dump", "to_csv", "tofile", "extractall"}
# Functions that create, replace or move files under a name.
MOVE_CALLS = {"os.rename", "os.replace", "os.link", "shutil.copy", "shutil.copy2", "shutil.copyfile",
              "shutil.copytree", "shutil.move"}
WRITE_FLAGS = {"O_WRONLY", "O_RDWR", "O_CREAT", "O_APPEND", "O_TRUNC"}
# The writes that cannot go through the writer, and why.
ALLOWED = {
    # A lock file is locked in place (flock needs the same file for the run's whole life), never replaced.
    ("dihkit/files/output_lock.py", "os.open"),
}


def dotted(node) -> str:
    """``os.open`` for the expression ``os.open``, ``open`` for ``open``; '' for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = dotted(node.value)
        return f"{inner}.{node.attr}" if inner else f"?.{node.attr}"
    return ""


def writer_files(tree) -> set:
    """Names bound by ``with atomic_file(...) as name``: a write into one of them goes through the writer."""
    return {item.optional_vars.id for node in ast.walk(tree) if isinstance(node, (ast.With, ast.AsyncWith))
            for item in node.items if isinstance(item.context_expr, ast.Call)
            and dotted(item.context_expr.func).split(".")[-1] == "atomic_file" and isinstance(item.optional_vars, ast.Name)}


def open_mode(call: ast.Call) -> str:
    """The mode string of an ``open``-like call ('' when none is given or it is not a literal)."""
    mode = next((k.value for k in call.keywords if k.arg == "mode"), call.args[1] if len(call.args) > 1 else None)
    return mode.value if isinstance(mode, ast.Constant) and isinstance(mode.value, str) else ""


def write_kind(call: ast.Call, into_writer: set) -> str | None:
    """What kind of file write ``call`` is, or None when it writes no file (or writes into the writer's file)."""
    name = dotted(call.func)
    last = name.split(".")[-1]
    if last in WRITE_CALLS and not any(isinstance(a, ast.Name) and a.id in into_writer for a in call.args):
        return f"{last}("
    if name in MOVE_CALLS:
        return f"{name}("
    if last in ("open", "fdopen") and name != "os.open" and set(open_mode(call)) & set("wax+"):
        return f"{last}(..., {open_mode(call)!r})"
    if name == "os.open" and any(isinstance(n, ast.Attribute) and n.attr in WRITE_FLAGS
                                 for a in call.args[1:2] for n in ast.walk(a)):
        return "os.open"
    return None


def unsafe_writes(root: Path = ROOT) -> list:
    """Every ``(file:line, call)`` outside the writer that writes a file another way (``ALLOWED`` apart)."""
    found = []
    for path in sorted(modules(root).values()):
        rel = path.relative_to(root).as_posix()
        if rel == WRITER:
            continue
        tree = ast.parse(path.read_text())
        into_writer = writer_files(tree)
        for node in sorted((n for n in ast.walk(tree) if isinstance(n, ast.Call)), key=lambda n: (n.lineno, n.col_offset)):
            kind = write_kind(node, into_writer)
            if kind and (rel, kind) not in ALLOWED:
                found.append((f"{rel}:{node.lineno}", kind))
    return found


def test_every_file_is_written_through_the_atomic_writer():
    assert unsafe_writes() == [], "write these through dihkit/files/atomic_files.py"


def test_planted_writes_of_every_kind_are_caught(tree_copy):
    """What report.py did before the writer (write_text, savefig on final names), and the other ways."""
    planted = ("from pathlib import Path\nimport json, os, shutil, torch\n"
               "Path('r.md').write_text('x')\nfig.savefig('r.png')\ntorch.save({}, 'm.pth')\n"
               "open('r.csv', 'w').write('x')\nopen('r.csv', mode='a')\njson.dump({}, f)\n"
               "os.replace('a', 'b')\nos.open('x', os.O_WRONLY | os.O_CREAT)\nopen('r.csv').read()\n"
               "with atomic_file('r.npz') as out:\n    np.savez(out, a=1)\n")
    (tree_copy / "report.py").write_text(planted + (tree_copy / "report.py").read_text())
    assert [kind for where, kind in unsafe_writes(tree_copy) if where.startswith("report.py:")] == [
        "write_text(", "savefig(", "save(", "open(..., 'w')", "open(..., 'a')", "dump(", "os.replace(", "os.open"]


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
