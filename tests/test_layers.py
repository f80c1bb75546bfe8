"""One namespace, one direction of import.

``converters/`` installs as ``gadget.converters`` and ``pipelines/`` as ``gadget.pipelines`` (package data;
pyproject.toml's ``package-dir``), so no module imports a top-level ``converters`` or ``pipelines``.
The core layers never import ``gadget.converters`` nor the top layers; the converters may import the core
but not the top layers; the top layers (the doors, the console script, the demo, the benchmarks) may
import both. Every import is read with ``ast``, those inside functions included."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CORE = ("mri", "model", "data", "recon", "stream", "baselines", "train", "evaluation")
TOP = ("cli", "replay", "demo", "server", "gadgetron", "bench", "openrecon")
DATA = ("weights", "pipelines")  # package data; anyone may read them
CONVERTERS = "converters"
OLD_TOP_LEVEL = ("converters", "pipelines")  # installed under gadget. now


def module_name(path: Path) -> str:
    """The installed name of a source file: ``converters/twix.py`` is ``gadget.converters.twix``."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] in ("converters", "pipelines"):
        parts.insert(0, "gadget")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> list[Path]:
    return [f for top in ("gadget", "converters", "pipelines") for f in sorted((ROOT / top).rglob("*.py"))
            if "__pycache__" not in f.parts]


def imports(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """``(line, module)`` for every import of a file, relative ones resolved; ``from a import b`` gives
    both ``a`` and ``a.b`` (``b`` may be a module); ``importlib.import_module("a.b")`` gives ``a.b``."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    if source is None:
        source = path.read_text(encoding="utf-8")
    found = []
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names if alias.name != "*"]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value))
    return found


def layer(module: str) -> str | None:
    """``core``, ``converters``, ``top``, ``data`` or ``root`` for a module of the package, else None."""
    parts = module.split(".")
    if parts[0] != "gadget":
        return None
    if len(parts) == 1:
        return "root"
    if parts[1] in CORE:
        return "core"
    if parts[1] == CONVERTERS:
        return "converters"
    if parts[1] in TOP:
        return "top"
    if parts[1] in DATA:
        return "data"
    return "unknown"


def _violation(importer: str, imported: str) -> str | None:
    if imported.split(".")[0] in OLD_TOP_LEVEL:
        return f"the top-level name '{imported.split('.')[0]}' is gone: import gadget.{imported}"
    mine, theirs = layer(importer), layer(imported)
    if mine == "core" and theirs == "converters":
        return "a core layer imports gadget.converters (move the helper into the core, or the caller up)"
    if mine in ("core", "converters", "data", "root") and theirs == "top":
        return f"{'the converters import' if mine == 'converters' else 'a lower layer imports'} a top layer"
    return None


def test_every_module_of_the_package_has_a_layer():
    unknown = sorted({module_name(f) for f in sources() if layer(module_name(f)) == "unknown"})
    assert not unknown, f"put these in a layer of tests/test_layers.py (CORE, TOP or DATA): {unknown}"


def test_imports_point_one_way():
    found = {}
    for f in sources():
        importer = module_name(f)
        for line, imported in imports(f):
            why = _violation(importer, imported)
            if why:  # one report per import statement: `from a import b` is not reported again as a.b
                found.setdefault((f, line), f"{f.relative_to(ROOT)}:{line}: {importer} imports {imported}: {why}")
    assert not found, "\n".join(found.values())


@pytest.mark.parametrize("importer, imported, bad", [
    ("gadget.train.data", "gadget.converters.simulate", True),
    ("gadget.evaluation.compare", "gadget.converters", True),
    ("gadget.converters.synth", "gadget.cli.synth", True),
    ("gadget.converters.twix", "gadget.server", True),
    ("gadget.recon.engine", "gadget.replay", True),
    ("gadget.cli.synth", "converters.synth", True),
    ("gadget.recon.config", "pipelines", True),
    ("gadget.converters.twix", "gadget.data.mrd_file", False),
    ("gadget.cli.synth", "gadget.converters.synth", False),
    ("gadget.demo", "gadget.converters.headsim", False),
    ("gadget.recon.config", "gadget.pipelines", False),
    ("gadget.train.data", "numpy", False),
])
def test_the_rule(importer, imported, bad):
    assert (_violation(importer, imported) is not None) == bad


def test_imports_are_resolved_as_installed():
    """Relative imports in converters/ resolve under gadget.converters; ``from gadget import converters``
    is seen as an import of gadget.converters; imports inside functions count."""
    probe = ROOT / "converters" / "probe.py"
    assert [m for _, m in imports(probe, "from .simulate import write_fastmri\nfrom . import tissue\n")] == [
        "gadget.converters.simulate", "gadget.converters.simulate.write_fastmri",
        "gadget.converters", "gadget.converters.tissue"]
    core = ROOT / "gadget" / "train" / "probe.py"
    found = imports(core, "def f():\n    from gadget import converters\n")
    assert (2, "gadget.converters") in found
    assert any(_violation(module_name(core), m) for _, m in found)
    assert module_name(ROOT / "pipelines" / "__init__.py") == "gadget.pipelines"


def subpackage(module: str) -> str | None:
    """``gadget.X`` for a module inside the package (``gadget.X.Y...`` or ``gadget.X``), else None."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "gadget" and len(parts) > 1 else None


def test_no_subpackage_imports_one_that_imports_it_back():
    """Between the package's parts the imports form no cycle of two (``gadget.model`` and ``gadget.recon``
    once did, through one import inside a function)."""
    edges: dict[str, dict[str, str]] = {}
    for path in sources():
        here = subpackage(module_name(path))
        for line, imported in imports(path):
            there = subpackage(imported)
            if here and there and there != here and there.split(".")[1] not in DATA:
                edges.setdefault(here, {}).setdefault(there, f"{path.relative_to(ROOT)}:{line}")
    cycles = [f"{a} -> {b} ({where}) and back ({edges[b][a]})" for a, targets in edges.items()
              for b, where in targets.items() if a < b and a in edges.get(b, {})]
    assert not cycles, "\n".join(cycles)
