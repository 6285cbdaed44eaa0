"""The package's imports point one way: no cycle, and nothing in it imports the web app or a command line."""

from __future__ import annotations

import ast
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter

from harness import ROOT

PACKAGE = ROOT / "bikeshare_membership"
ENTRY_MODULES = {"app", "batch_cli", "train_cli", "wait_cli"}  # what only root scripts and Gunicorn import


def package_imports() -> dict[str, set[str]]:
    """Each module of the package -> the package's modules it imports (at any depth of its code)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.glob("*.py")):
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == PACKAGE.name:
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (module := node.module or "").startswith(f"{PACKAGE.name}."):
                imported.add(module.split(".", 1)[1])
            elif isinstance(node, ast.Import):
                imported |= {
                    alias.name.split(".", 1)[1] for alias in node.names if alias.name.startswith(f"{PACKAGE.name}.")
                }
        graph[path.stem] = imported - {path.stem}
    return graph


def test_the_package_has_no_import_cycle() -> None:
    graph = package_imports()
    assert {"schema", "features", "model_store", "app"} <= set(graph)  # the walk found the modules
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as error:
        raise AssertionError(f"import cycle: {error.args[1]}") from None
    assert set(order) == set(graph)


def test_nothing_in_the_package_imports_the_app_or_a_command_line() -> None:
    importers = {module: imported & ENTRY_MODULES for module, imported in package_imports().items()}
    assert {module: found for module, found in importers.items() if found} == {}


def test_what_scores_a_saved_fast_form_imports_neither_mlflow_nor_scikit_learn() -> None:
    """A Spark worker starts from its daemon's imports, and builds the shipped version from its saved fast form
    (model_files): neither pulls in MLflow, scikit-learn or boto3, seconds of every worker's start."""
    script = (
        "import sys\n"
        "import bikeshare_membership.model_files, bikeshare_membership.spark_daemon\n"
        "print(sorted(name for name in ('mlflow', 'sklearn', 'skops', 'boto3') if name in sys.modules))\n"
    )
    imported = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "[]"
