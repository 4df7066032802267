"""The serving commands of the README and of docs/serving.md's quick start, run as printed.

Each ```bash block is run line by line from the repository root, as a user pastes it into a shell: a line
ending in `&` starts the server in the background, and the next line waits until it answers (as a user
waits for "Application startup complete"); every other line runs in bash and must succeed. The server
runs with the user's environment: ``VLLM_CPU_KVCACHE_SPACE`` (which ``make test-vllm`` sets for the other
tests) is removed, so the pool is the one ``lacache serve`` sizes itself. If port 8000 is taken on this
machine the port is changed, the one edit made to the printed lines.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm")

ROOT = Path(__file__).resolve().parents[2]


def _block(path: Path, after: str) -> list[str]:
    """The commands of the first ```bash block after the line starting with ``after`` (continuations joined)."""
    text = path.read_text(encoding="utf-8")
    section = text.split(after, 1)[1]
    body = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    commands, current = [], ""
    for line in body.splitlines():
        code = re.sub(r"\s+#\s.*$", "", line)  # a trailing comment
        current += code.rstrip("\\").rstrip() + " " if code.rstrip().endswith("\\") else code
        if not code.rstrip().endswith("\\"):
            if current.strip():
                commands.append(current.strip())
            current = ""
    return commands


def _free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _wait(port: int, server: subprocess.Popen, log: Path, seconds: float = 600) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert server.poll() is None, log.read_text()[-4000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(2)
    raise AssertionError("the server did not answer: " + log.read_text()[-4000:])


def _run(commands: list[str], tmp_path: Path) -> tuple[list[str], str]:
    port = 8000 if _free(8000) else next(p for p in range(8100, 8200) if _free(p))
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_ENABLE_V1_MULTIPROCESSING")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    outputs, server, log = [], None, tmp_path / "server.log"
    try:
        for command in commands:
            command = command.replace(":8000", f":{port}").replace("--port 8000", f"--port {port}")
            if command.endswith("&"):
                server = subprocess.Popen(command[:-1], shell=True, cwd=ROOT, env=env, stdout=log.open("w"),
                                          stderr=subprocess.STDOUT, start_new_session=True)
                _wait(port, server, log)
                continue
            run = subprocess.run(["bash", "-c", "set -o pipefail; " + command], cwd=ROOT, env=env,
                                 capture_output=True, text=True, timeout=900)
            assert run.returncode == 0, (command, run.stdout[-2000:], run.stderr[-2000:])
            outputs.append(run.stdout)
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGINT)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
    return outputs, log.read_text()


def _started(log: str) -> None:
    assert "lacache: bounded KV cache on" in log
    assert "lacache: KV pool sized for the bounded rows" in log  # lacache serve sized the pool itself
    assert "--enable-prompt-tokens-details" in log


def test_the_readme_serving_commands_run_as_printed(tmp_path):
    commands = _block(ROOT / "README.md", "## Serve it in vLLM")
    assert commands[0].startswith("make vllm-env") and commands[1].startswith(".venv-vllm/bin/lacache serve")
    outputs, log = _run(commands, tmp_path)
    _started(log)
    answer = json.loads(outputs[1])
    assert answer["choices"][0]["text"]
    compactions = sum(float(line.split()[-1]) for line in outputs[2].splitlines())
    assert compactions > 0 or answer["usage"]["total_tokens"] <= 256  # past the budget, it compacted


def test_the_serving_quick_start_runs_as_printed(tmp_path):
    commands = _block(ROOT / "docs" / "serving.md", "Quick start")
    assert commands[0].startswith(".venv-vllm/bin/lacache serve")
    outputs, log = _run(commands, tmp_path)
    _started(log)
    answer = json.loads(outputs[0])
    assert answer["choices"][0]["text"]
    assert "lacache_compactions_total" in outputs[1]
