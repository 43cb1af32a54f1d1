"""Write docs/cli.md from the parser itself, so the command-line reference cannot drift from `--help`.

Run `python scripts/cli_reference.py` after changing a parser; `tests/test_cli_reference.py` fails
while docs/cli.md differs from what this prints. Machine-dependent defaults are shown as on a
2-core machine.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
HEADER = """# Command-line reference

Generated from `autoseg <command> --help` by `scripts/cli_reference.py`; run that for the current
text. Defaults that depend on the machine (`--workers` of verify, plan and evaluate: the number of
CPU cores, at most 8) are shown as on a 2-core machine.
"""
WIDTH = 98


def cli_reference() -> str:
    """The whole of docs/cli.md."""
    sys.path.insert(0, str(REPO))
    with mock.patch.dict(os.environ, {"COLUMNS": str(WIDTH + 2)}), mock.patch("os.cpu_count", return_value=2):
        from autoseg import cli

        parser = cli.build_parser()
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        sections = [("autoseg", parser)] + [(f"autoseg {name}", sub) for name, sub in commands.items()]
        return HEADER + "".join(f"\n## {title}\n\n```\n{p.format_help().rstrip()}\n```\n" for title, p in sections)


if __name__ == "__main__":
    (REPO / "docs" / "cli.md").write_text(cli_reference(), encoding="utf-8")
    print(f"wrote {REPO / 'docs' / 'cli.md'}")
