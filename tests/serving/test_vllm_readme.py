"""The README's vLLM snippet runs as printed (in a process of its own, as a user runs a script) and
generates past its budget."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_vllm_snippet_runs_as_printed(tmp_path):
    section = README.read_text().split("\n## Serve it in vLLM\n", 1)[1].split("\n## ", 1)[0]
    (snippet,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    script = tmp_path / "snippet.py"
    script.write_text(snippet)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    found = re.search(r"(\d+) new tokens through (\d+) slots per layer", run.stdout)
    assert found, run.stdout[-2000:]
    assert int(found.group(1)) > int(found.group(2))  # past the budget: the plugin compacted
