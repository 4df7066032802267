"""The default vLLM engine runs its scheduler and its worker in separate processes: the plugin must
work there too (both halves replay the rule on their own), and it switches prefix caching off."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")


def test_multiprocess_engine_gives_the_transformers_tokens():
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    run = subprocess.run([sys.executable, str(Path(__file__).with_name("mp_check.py")), "200"], env=env,
                         capture_output=True, text=True, timeout=900)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT")]
    assert run.returncode == 0, run.stderr[-3000:]
    assert lines == ["RESULT 4 equal", "RESULT 73 equal"], lines
    # vLLM's own log handler writes to stdout unless VLLM_LOGGING_STREAM says otherwise.
    assert "prefix caching switched off" in run.stdout + run.stderr
