"""The longest functions and modules of the toolkit (tests excluded), against one screen and ~400 lines.

    python3 scripts/check_sizes.py [--top N]

Functions made mostly of flag declarations (five or more ``add_argument``/``flag(`` calls) are listed
apart: a parser's declarations are data, not logic. Exits 1 when a function exceeds 60 lines or a
module 400.
"""
import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION, MAX_MODULE = 60, 400


def sources() -> list[Path]:
    """The repository's Python files outside tests/ and hidden folders."""
    return sorted(p for p in ROOT.rglob("*.py")
                  if not any(part.startswith(".") or part == "tests" for part in p.relative_to(ROOT).parts))


def measure(path: Path) -> tuple[int, list]:
    """(lines of the module, [(lines, name, is_declarations)] of its functions)."""
    text = path.read_text()
    functions = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            segment = ast.get_source_segment(text, node) or ""
            declarations = segment.count("add_argument") + segment.count("flag(") >= 5
            functions.append((node.end_lineno - node.lineno + 1, node.name, declarations))
    return text.count("\n"), functions


def main(argv=None) -> int:
    """Print the longest functions and modules; exit 1 when a limit is exceeded."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--top", type=int, default=5, help="how many of each to list")
    top = p.parse_args(argv).top
    modules, functions = [], []
    for path in sources():
        lines, funcs = measure(path)
        rel = path.relative_to(ROOT)
        modules.append((lines, str(rel)))
        functions += [(n, f"{rel}:{name}") for n, name, declarations in funcs if not declarations]
    modules.sort(reverse=True)
    functions.sort(reverse=True)
    print("longest functions (lines):")
    for n, name in functions[:top]:
        print(f"  {n:5d}  {name}")
    print("largest modules (lines):")
    for n, name in modules[:top]:
        print(f"  {n:5d}  {name}")
    over = [f for f in functions if f[0] > MAX_FUNCTION] + [m for m in modules if m[0] > MAX_MODULE]
    for n, name in over:
        print(f"over the limit: {name} ({n} lines)", file=sys.stderr)
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
