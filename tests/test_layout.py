"""The package's shape: one subpackage a pipeline stage, imports that run one way only, no cycles, and
private torch/transformers APIs used in `garage._compat` alone.

The rules are read from the source (every import statement, also those inside functions), not from an
imported garage, so a lazy import cannot hide an upward dependency.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "garage"

# The pipeline, earliest first. A module may import its own stage and the stages before it, never after.
ORDER = ["_version", "_compat", "_guards", "_graph_format", "_cache", "models", "sae", "lang", "ops", "plan", "fx", "check", "runtime",
         "compiler", "patching", "steering", "pictures", "analyze", "vectors", "interop", "conditions", "features", "blades", "training", "vllm", "highlight", "core", "inject", "cli", "__init__", "__main__"]
STAGE_PACKAGES = ["lang", "ops", "plan", "fx", "check", "runtime"]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(module: str, modules: dict[str, Path]) -> set[str]:
    """The garage modules that `module` imports, relative imports resolved, `from X import name` counted
    as `X.name` where that is a module."""
    path = modules[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "garage")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            if origin.split(".")[0] != "garage":
                continue
            for alias in node.names:
                found.add(f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in modules else origin)
    return found - {module}


def import_graph(root: Path) -> nx.DiGraph:
    """Module → the garage modules it imports, for the package at `root`."""
    modules = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph = nx.DiGraph([(m, target) for m in modules for target in imports(m, modules)])
    graph.add_nodes_from(modules)
    return graph


def upward(graph: nx.DiGraph) -> list[str]:
    return [f"{m} imports {t}" for m, t in graph.edges if ORDER.index(stage(t)) > ORDER.index(stage(m))]


GRAPH = import_graph(PACKAGE)
MODULES = {module_name(p, PACKAGE): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_belongs_to_a_known_stage():
    assert {stage(m) for m in MODULES} <= set(ORDER)
    assert set(GRAPH.nodes) == set(MODULES), "an import names a garage module that does not exist"


def test_imports_run_one_way():
    found = upward(GRAPH)
    assert not found, "later stages may import earlier ones, never the reverse:\n" + "\n".join(found)


def test_no_import_cycles():
    cycles = list(nx.simple_cycles(GRAPH))
    assert not cycles, f"import cycles: {cycles}"


def test_a_planted_upward_import_and_cycle_are_caught(tmp_path):
    """The checks above are not vacuous: the same code finds a bad import in a small planted package."""
    root = tmp_path / "garage"
    for package in ("", "plan", "runtime"):
        (root / package).mkdir(exist_ok=True)
        (root / package / "__init__.py").write_text("")
    (root / "plan" / "resolve.py").write_text("def f():\n    from ..runtime.injected import InjectedModel\n")
    (root / "runtime" / "injected.py").write_text("from ..plan import resolve\n")
    graph = import_graph(root)
    assert upward(graph) == ["garage.plan.resolve imports garage.runtime.injected"]
    assert list(nx.simple_cycles(graph))


@pytest.mark.parametrize("package", STAGE_PACKAGES)
def test_each_stage_says_its_job_and_what_it_may_import(package):
    doc = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text(encoding="utf-8")))
    assert doc and "May import:" in doc
    allowed = set(re.findall(r"garage\.(\w+)", doc.split("May import:")[1])) | {package}
    if "every earlier stage" in doc:
        allowed |= set(ORDER[: ORDER.index(package)])
    used = {stage(t) for m, t in GRAPH.edges if stage(m) == package}
    assert used <= allowed, f"{package} imports {sorted(used - allowed)}, which its docstring does not allow"


PRIVATE = re.compile(
    r"torch\._(?!_)\w+|\._codegen\b|_in_spec|_out_spec|_forward(_pre)?_hooks|_attn_implementation"
    r"|is_torchdynamo_exporting|DynamicLayer|\bfx\.experimental\b|_LazyGraphModule|allow_non_fake_inputs"
)


PRIVATE_API_MODULES = ("garage._compat", "garage._guards", "garage._graph_format")  # each says what it was checked on


def test_private_apis_live_in_compat_only():
    offenders = []
    for module, path in MODULES.items():
        if module in PRIVATE_API_MODULES:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            code = line.split("#")[0]
            if PRIVATE.search(code):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert not offenders, "private torch/transformers APIs outside their modules:\n" + "\n".join(offenders)
    for module in PRIVATE_API_MODULES:
        assert "checked on torch" in (ast.get_docstring(ast.parse(MODULES[module].read_text(encoding="utf-8"))) or "").lower()


def test_every_compat_entry_says_what_it_was_checked_on():
    tree = ast.parse((PACKAGE / "_compat.py").read_text(encoding="utf-8"))
    entries = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_")]
    assert entries
    for node in entries:
        assert "checked on" in (ast.get_docstring(node) or ""), f"_compat.{node.name} does not say what it was checked on"


def test_version_comes_from_the_installed_metadata():
    import garage

    pyproject = (PACKAGE.parent / "pyproject.toml").read_text(encoding="utf-8")
    declared = re.search(r'^version = "([^"]+)"', pyproject, re.MULTILINE)
    assert declared and garage.__version__ == declared.group(1)


def test_the_package_ships_its_type_marker_and_grammar():
    from importlib import resources

    assert resources.files("garage").joinpath("py.typed").is_file()
    assert resources.files("garage.lang").joinpath("grammar", "garage.lark").is_file()
