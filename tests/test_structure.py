"""The shape of the source tree: floors without import circles, short files and functions,
one home per concept (a masking strategy's name in at most two files, one lr schedule),
and library code that leaves process-wide state to the entry points."""

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "mwm"
MAX_FILE_LINES = 550  # "about 500": the longest, pretrain/sparse.py, has 535
# The phantom anatomy: drawing recipes that read one random stream in order (splitting them
# would be easy to get wrong and buys nothing).
LONG_FILES = {"data/anatomy.py"}
MAX_FUNCTION_LINES = 80


def modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every mwm module ``name`` imports, at any depth of the file (lazy imports included),
    except under ``if TYPE_CHECKING``."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if not name.startswith(base + "."):  # `from . import x`: x, not our own package
                found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in found if m in known and m != name}


def test_no_import_circles():
    mods = modules()
    graph = {name: imports_of(name, path, set(mods)) for name, path in mods.items()}
    # importing a package's module imports the package first: its __init__'s imports count
    state, stack, circles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                circles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    # a package's __init__ importing its own submodules is not a circle
    circles = [c for c in circles if not all(m.startswith(c[0] + ".") or m == c[0] for m in c)]
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_files_and_functions_are_short():
    long_files, long_functions = [], []
    for path in SRC.rglob("*.py"):
        rel = str(path.relative_to(SRC))
        lines = path.read_text().count("\n")
        if rel in LONG_FILES:
            continue
        if lines > MAX_FILE_LINES:
            long_files.append(f"{rel}: {lines} lines")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{rel}:{node.lineno} {node.name}: {length} lines")
    assert not long_files and not long_functions, long_files + long_functions


def string_literals(path: Path) -> set[str]:
    return {node.value for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def test_a_masking_strategy_is_named_in_at_most_two_files():
    from mwm.masking import MASKINGS

    literals = {path: string_literals(path) for path in SRC.rglob("*.py")}
    for name in MASKINGS.names():
        files = sorted(str(p.relative_to(SRC)) for p, found in literals.items() if name in found)
        assert len(files) <= 2, f"masking strategy {name!r} is named in {files}"


def test_one_learning_rate_schedule():
    homes = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
             if re.search(r"def lr_at\b|def _lr_factor\b", p.read_text())]
    assert homes == ["engine.py"], homes


@pytest.mark.parametrize("call", [r"set_flush_denormal", r"set_num_threads", r"os\.environ\.pop",
                                  r"os\.environ\[[^]]+\]\s*=", r"os\.environ\.setdefault"])
def test_process_state_is_set_by_entry_points_only(call):
    allowed = {"runtime.py"}  # the entry points' helpers
    offenders = [str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
                 if re.search(call, p.read_text()) and str(p.relative_to(SRC)) not in allowed]
    assert not offenders, f"{call} in library code: {offenders}"


def test_registries_drive_the_choices():
    """The CLI's masking choices, the experiment's strategies and the tasks read registries."""
    from mwm.cli import main
    from mwm.downstream.tasks import TASKS
    from mwm.experiment import parse_experiment
    from mwm.masking import MASKINGS

    assert {"linear-probe", "finetune", "detect"} <= set(TASKS.names())
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    for name in MASKINGS.names():  # every registered strategy parses in an experiment file
        strategy = MASKINGS.get(name)
        raw = {"name": "t", "data": {"images": "x"}, "pretrain": {}, "evaluate": [{"name": "e"}],
               "strategies": [{"name": "s", "masking": name, "regions": "ground_truth"}]}
        config = parse_experiment(raw)
        assert config.strategies[0].reads_regions == strategy.needs_regions
