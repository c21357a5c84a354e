"""The package layout docs/development.md ("Where things are") describes: imports run one way, library code
never imports a command module, and nothing silences another module's output."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "nnunet_acnorm"
#: lowest first: a module may import from its own layer and from the layers before it
LAYERS = ["errors", "outputs", "inputs", "norms", "networks", "checkpoints", "finetuning", "nnunet", "compare", "demo",
          "ranking", "classification", "benchmark", "commands"]
#: layers side by side (neither imports the other)
PEERS = [{"demo", "ranking", "classification", "benchmark"}]


def _layer(path: Path) -> str | None:
    part = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    return part if part in LAYERS else None


def _imports(source: str):
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name


def upward_imports(layer: str, source: str) -> list[str]:
    """The imports of ``source`` (a module of ``layer``) that go against the layer order."""
    found = []
    for line, module in _imports(source):
        parts = module.split(".")
        if parts[0] != "nnunet_acnorm" or len(parts) < 2 or parts[1] not in LAYERS or parts[1] == layer:
            continue
        peers = any({layer, parts[1]} <= group for group in PEERS)
        if LAYERS.index(parts[1]) > LAYERS.index(layer) or peers:
            found.append(f"line {line}: {module} ('{layer}' may not import '{parts[1]}')")
    return found


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if _layer(p) is not None)


def test_every_module_is_in_a_layer():
    outside = [p.relative_to(PACKAGE) for p in PACKAGE.rglob("*.py")
               if _layer(p) is None and p.name != "__init__.py"]
    assert not outside, f"modules outside the layers {LAYERS}: {outside}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_one_way(path):
    assert upward_imports(_layer(path), path.read_text()) == [], path.relative_to(PACKAGE)


def test_no_output_is_silenced_by_redirecting_stdout():
    offenders = [f"{p.relative_to(PACKAGE)}:{line}" for p in PACKAGE.rglob("*.py")
                 for line, text in enumerate(p.read_text().splitlines(), 1) if "redirect_stdout" in text]
    assert not offenders, f"redirect_stdout in {offenders}: give the library an output callable instead"


def test_layer_check_catches_upward_and_peer_imports():
    """The check itself, on sources it must refuse and accept."""
    assert upward_imports("norms", "from nnunet_acnorm.commands import _cli\n") == \
        ["line 1: nnunet_acnorm.commands ('norms' may not import 'commands')"]
    assert len(upward_imports("ranking", "import nnunet_acnorm.classification.trainer\n")) == 1
    assert upward_imports("commands", "from nnunet_acnorm.norms import functional\nimport torch\n") == []
    assert upward_imports("nnunet", "from nnunet_acnorm.nnunet.trainers import TRAINERS\n") == []


# -- no import circle between files ------------------------------------------------------------------
def _module_file(name: str) -> Path | None:
    """The file of module ``name`` of the package (``a.b`` -> a/b.py or a/b/__init__.py), or None."""
    parts = name.split(".")
    if parts[0] != PACKAGE.name:
        return None
    base = PACKAGE.parent.joinpath(*parts)
    return next((f for f in (base.with_suffix(".py"), base / "__init__.py") if f.is_file()), None)


def file_imports(path: Path) -> set[Path]:
    """The package's files that ``path`` imports, anywhere in it (in functions too): ``from a import b``
    counts as an import of the module a.b where that is a file, else of a."""
    package = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = package[:-1]  # the package a relative import starts from (for __init__.py: itself)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(_module_file(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.update(_module_file(f"{module}.{alias.name}") or _module_file(module) for alias in node.names)
    return found - {None, path}


def file_circles(graph: dict) -> list[list]:
    """The strongly connected components of more than one node of the directed ``graph`` (node ->
    the nodes it imports): every set of files that import each other, directly or through others."""
    index, low, stack, on_stack, circles = {}, {}, [], set(), []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph.get(root, ())))]  # Tarjan's algorithm, without recursion
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph.get(child, ()))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    circles.append(sorted(component))
    return circles


def test_no_import_circle_between_files():
    graph = {p: file_imports(p) for p in sorted(PACKAGE.rglob("*.py"))}
    circles = [[str(p.relative_to(PACKAGE)) for p in circle] for circle in file_circles(graph)]
    assert not circles, f"files that import each other: {circles}"


def test_circle_check_finds_circles():
    """The check itself: direct and indirect circles found, a one-way chain and a diamond accepted."""
    assert file_circles({"a": {"b"}, "b": {"a"}}) == [["a", "b"]]
    assert file_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert file_circles({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) == []
    functional = PACKAGE / "norms" / "functional.py"
    assert PACKAGE / "norms" / "_sorted_shared.py" in file_imports(functional)
    assert PACKAGE / "norms" / "_sorted_numpy.py" in file_imports(functional)  # an import inside a function
    trainers = PACKAGE / "nnunet" / "trainers.py"
    assert trainers in file_imports(PACKAGE / "nnunet" / "nnunet_ext" / "nnunet_acnorm_trainers.py")


# -- one error boundary ------------------------------------------------------------------------------
#: where an InputError becomes the process exit: the console scripts, and the trainers' nnU-Net entry
EXIT_BOUNDARIES = ("commands", "nnunet/trainer_entry.py")


def process_exits(source: str) -> list[int]:
    """The lines of ``source`` that end the process: ``raise SystemExit``, ``sys.exit()``, ``exit()``,
    ``quit()``, ``os._exit()``."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        target = node.exc if isinstance(node, ast.Raise) else node.func if isinstance(node, ast.Call) else None
        if isinstance(node, ast.Raise) and isinstance(target, ast.Call):
            target = target.func
        name = target.id if isinstance(target, ast.Name) else \
            f"{getattr(target.value, 'id', '')}.{target.attr}" if isinstance(target, ast.Attribute) else None
        if (isinstance(node, ast.Raise) and name in ("SystemExit", "builtins.SystemExit")) or \
                (isinstance(node, ast.Call) and name in ("sys.exit", "exit", "quit", "os._exit")):
            lines.append(node.lineno)
    return sorted(lines)


def test_no_process_exit_outside_the_boundaries():
    offenders = [f"{p.relative_to(PACKAGE)}:{line}" for p in sorted(PACKAGE.rglob("*.py"))
                 if not str(p.relative_to(PACKAGE)).startswith(EXIT_BOUNDARIES)
                 for line in process_exits(p.read_text())]
    assert not offenders, f"library code ends the process at {offenders}: raise an InputError subclass " \
                          f"(nnunet_acnorm/errors.py) instead; only {EXIT_BOUNDARIES} turn it into the exit"


def test_exit_check_finds_every_form():
    source = ("import sys, os\nraise SystemExit('x')\nraise SystemExit\nsys.exit(1)\nexit(2)\nos._exit(3)\n"
              "raise ValueError('fine')\nprint('fine')\n")
    assert process_exits(source) == [2, 3, 4, 5, 6]
    assert process_exits((PACKAGE / "nnunet" / "trainer_entry.py").read_text())  # the boundary itself is seen


# -- short functions ---------------------------------------------------------------------------------
#: the longest a function (or method) of the package may be, from its ``def`` line to its last line
MAX_FUNCTION_LINES = 60


def long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``name (lines)`` of every function of ``source`` longer than ``limit`` lines (nested ones too)."""
    return [f"{node.name} ({node.end_lineno - node.lineno + 1})" for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > limit]


def test_no_function_is_longer_than_the_limit():
    offenders = [f"{p.relative_to(PACKAGE)}: {name}" for p in sorted(PACKAGE.rglob("*.py"))
                 for name in long_functions(p.read_text())]
    assert not offenders, f"functions over {MAX_FUNCTION_LINES} lines: {offenders}; split them"


def test_function_length_check_measures_from_def_to_last_line():
    body = "".join(f"    x{i} = {i}\n" for i in range(4))
    assert long_functions(f"def f():\n{body}", limit=5) == []
    assert long_functions(f"def f():\n{body}    return x0\n", limit=4) == ["f (6)"]
    assert long_functions(f"class C:\n    async def g(self):\n    {body.replace(chr(10), chr(10) + '    ')}\n",
                          limit=3) == ["g (5)"]
