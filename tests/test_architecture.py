"""The layer contracts of docs/architecture.md hold: import-linter checks the
contracts declared in pyproject.toml (layers, a sans-I/O tunnel, no import
cycles in any package), and no module grows past ~400 lines unless its
docstring says why."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("tunnel", "relay", "httpcontract", "runtime", "edge_proxy", "worker_agent", "inference", "loadtest")
LONG = 400


def test_import_contracts_are_kept() -> None:
    out = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                          "sys.exit(lint_imports_command())", "--no-cache"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "BROKEN" not in out.stdout and "KEPT" in out.stdout


def test_long_modules_say_why() -> None:
    unexplained = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            lines = path.read_text().count("\n")
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            if lines > LONG and "long because" not in doc.lower():
                unexplained.append(f"{path.relative_to(ROOT)}: {lines} lines")
    assert unexplained == [], "modules over ~400 lines need 'Long because ...' in their docstring"
