"""docs/cli.md is what `autoseg <command> --help` prints: a changed option must reach the reference."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_docs_cli_md_matches_the_parser():
    spec = importlib.util.spec_from_file_location("cli_reference", REPO / "scripts" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (REPO / "docs" / "cli.md").read_text(encoding="utf-8") == module.cli_reference(), (
        "docs/cli.md is out of date: run `python scripts/cli_reference.py`")


def test_python_m_autoseg_runs_the_same_command_line():
    """`python -m autoseg` works where the `autoseg` script is not on PATH (a venv not activated, Windows)."""
    import subprocess
    import sys

    from autoseg import __version__

    done = subprocess.run([sys.executable, "-m", "autoseg", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert __version__ in done.stdout
    bad = subprocess.run([sys.executable, "-m", "autoseg", "train"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "usage: autoseg train" in bad.stderr
