"""The package layout docs/development.md ("Where things are") describes: imports run one way, library code
never imports a command module, and nothing silences another module's output."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "nnunet_acnorm"
#: lowest first: a module may import from its own layer and from the layers before it
LAYERS = ["errors", "outputs", "norms", "networks", "checkpoints", "finetuning", "nnunet", "demo", "ranking",
          "classification", "benchmark", "commands"]
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
