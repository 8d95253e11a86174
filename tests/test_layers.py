"""The architecture's layering rules (pyproject.toml [tool.importlinter]) hold."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def test_import_contracts_are_kept():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    result = subprocess.run([exe], cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
