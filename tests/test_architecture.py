"""Dependencies run one way, down the pipeline (STYLE.md); checked on the source with scripts/code_map.py."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "code_map.py"


def _load_code_map() -> ModuleType:
    spec = importlib.util.spec_from_file_location("code_map", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


code_map = _load_code_map()


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return code_map.import_graph(REPO)


def _importers(graph: dict[str, set[str]], importer_package: str, imported_package: str) -> list[tuple[str, str]]:
    assert any(code_map.inside(m, importer_package) for m in graph), f"no modules under {importer_package}"
    return code_map.imports_between(graph, importer_package, imported_package)


def test_nothing_imports_cli(graph):
    """Only `python -m autoseg` (autoseg/__main__.py, an entry point like the `autoseg` script) imports the CLI."""
    assert "autoseg.cli" in graph
    assert [m for m, targets in graph.items() if "autoseg.cli" in targets] == ["autoseg.__main__"]


@pytest.mark.parametrize("stage", ["autoseg.dataset", "autoseg.fingerprint", "autoseg.planning",
                                   "autoseg.preprocessing", "autoseg.network"])
def test_earlier_stages_do_not_import_training(graph, stage):
    assert _importers(graph, stage, "autoseg.training") == []


def test_inference_does_not_import_training(graph):
    """Prediction needs nothing from training: model files live in autoseg/model_files.py, which both use."""
    assert _importers(graph, "autoseg.inference", "autoseg.training") == []


def test_every_import_runs_down_the_layer_table(graph):
    """A new module must be placed in scripts/code_map.py's LAYERS, and may import only from its layer or below."""
    assert code_map.upward_imports(graph) == []


def test_graph_sees_imports_in_functions_and_relative_imports(tmp_path):
    """The rules above are only as good as the graph: an import the parser missed would pass them silently."""
    files = {
        "autoseg/__init__.py": "",
        "autoseg/cli.py": "def main(): pass\n",
        "autoseg/training/__init__.py": "",
        "autoseg/training/checkpoint.py": "",
        "autoseg/inference/__init__.py": "",
        "autoseg/inference/predictor.py": "def load():\n    from autoseg.training import checkpoint\n",
        "autoseg/inference/export.py": "from ..cli import main\nimport autoseg.training.checkpoint as ckpt\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = code_map.import_graph(tmp_path)
    assert graph["autoseg.inference.predictor"] == {"autoseg.training.checkpoint"}
    assert graph["autoseg.inference.export"] == {"autoseg.cli", "autoseg.training.checkpoint"}
    assert ("autoseg.inference.predictor", "autoseg.training.checkpoint") in code_map.upward_imports(graph)


def test_code_map_json_runs_on_the_repo_and_lists_cli():
    result = subprocess.run([sys.executable, str(SCRIPT), "--json"], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["graph"]["autoseg.cli"], "cli imports no autoseg module: the graph is broken"
    assert report["module_lines"]["autoseg/cli.py"] > 0
    assert len(report["largest_functions"]) == 15
