"""Every example runs to the end, so none goes stale."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parents[1] / "examples").glob("*.py"))


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(example, tmp_path):
    args = [sys.executable, str(example)] + ([str(tmp_path / "out")] if example.name == "quickstart.py" else [])
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=example.parents[1],
                            env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip(), "an example should print what it did"
