"""A long chat through vLLM's OpenAI-compatible server, with the ``openai`` client, turn by turn.

Each turn sends the whole conversation again, as chat clients do. Three servers answer the same
conversation in turn:

* ``lacache`` with ``reuse`` (the default): each turn continues the previous turn's compacted cache
  and computes only its new tokens;
* ``lacache`` without ``reuse``: each turn is a full prefill of the conversation into a fresh cache;
* plain vLLM with prefix caching: the conversation's blocks are shared from turn to turn, so a turn
  computes only its new tokens too, but its KV grows with the conversation.

Per turn: prompt tokens, tokens the server did not compute (``prompt_tokens_details.cached_tokens``),
time to first token, the turn's wall time, and the KV pool in use while the answer streams (vLLM's
``vllm:kv_cache_usage_perc``, read once the first token arrived).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator

__all__ = ["CHAT_SERVERS", "bench_vllm_chat", "serving", "user_messages"]

#: (label, lacache settings or None, prefix caching)
CHAT_SERVERS = (("lacache+reuse", {"reuse": True}, False), ("lacache", {"reuse": False}, False),
                ("full+prefix-caching", None, True))


def user_messages(text: str, turns: int, words: int) -> list[str]:
    """``turns`` user messages of ``words`` words each, cut from ``text`` in order."""
    pieces = text.split()
    if len(pieces) < turns * words:
        raise ValueError(f"the text has {len(pieces)} words; {turns} turns of {words} words need more")
    return [" ".join(pieces[i * words:(i + 1) * words]) for i in range(turns)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kv_usage(base: str) -> float:
    with urllib.request.urlopen(f"{base}/metrics", timeout=30) as response:
        text = response.read().decode()
    values = [float(m.group(1)) for m in re.finditer(r"^vllm:kv_cache_usage_perc\{[^}]*\} ([-+.\deE]+)$", text, re.M)]
    return max(values) if values else float("nan")


@contextlib.contextmanager
def serving(argv: list[str], port: int, log_path: str, env: dict | None = None,
            start_timeout: float = 300) -> Iterator[subprocess.Popen]:
    """Run the server command ``argv`` (listening on 127.0.0.1:``port``), its output in ``log_path``; yields
    the process once ``/health`` answers, and stops it on leaving (SIGTERM, then SIGKILL after 60 s)."""
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.time() + start_timeout
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"the vLLM server exited with {server.returncode}; see {log_path}")
                try:
                    urllib.request.urlopen(f"{base}/health", timeout=5)
                    break
                except OSError:
                    if time.time() > deadline:
                        raise RuntimeError(f"the vLLM server did not start in {start_timeout:.0f} s; "
                                           f"see {log_path}") from None
                    time.sleep(2)
            yield server
        finally:
            server.terminate()
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


@contextlib.contextmanager
def _server(model_dir: str, lacache: dict | None, prefix_caching: bool, max_model_len: int, dtype: str,
            log_path: str) -> Iterator[str]:
    """An OpenAI-compatible vLLM server on a free local port; yields its base URL."""
    port = _free_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--host", "127.0.0.1",
            "--port", str(port), "--dtype", dtype, "--max-model-len", str(max_model_len), "--enforce-eager",
            "--enable-prompt-tokens-details", "--served-model-name", "chat",
            "--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching"]
    if lacache is not None:
        argv += ["--additional-config", json.dumps({"lacache": lacache})]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    with tempfile.TemporaryDirectory() as prom:
        env["PROMETHEUS_MULTIPROC_DIR"] = prom
        with serving(argv, port, log_path, env):
            yield f"http://127.0.0.1:{port}"


def _conversation(base: str, label: str, messages: list[str], answer_tokens: int,
                  on_row: Callable[[dict], None] | None) -> list[dict]:
    from openai import OpenAI

    client = OpenAI(base_url=f"{base}/v1", api_key="none")
    history: list[dict] = []
    rows = []
    for turn, text in enumerate(messages, 1):
        history.append({"role": "user", "content": text})
        started = time.perf_counter()
        first = None
        usage_seen = None
        kv = float("nan")
        parts = []
        stream = client.chat.completions.create(model="chat", messages=history, max_tokens=answer_tokens,
                                                temperature=0, stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                if first is None:
                    first = time.perf_counter() - started
                    kv = _kv_usage(base)
                parts.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                usage_seen = chunk.usage
        wall = time.perf_counter() - started
        answer = "".join(parts)
        history.append({"role": "assistant", "content": answer})
        prompt = int(usage_seen.prompt_tokens) if usage_seen else 0
        details = getattr(usage_seen, "prompt_tokens_details", None) if usage_seen else None
        cached = int(getattr(details, "cached_tokens", 0) or 0) if details is not None else 0
        row = {"server": label, "turn": turn, "prompt_tokens": prompt, "cached_tokens": cached,
               "computed_tokens": prompt - cached, "answer_tokens": int(usage_seen.completion_tokens) if usage_seen else 0,
               "ttft_s": round(first if first is not None else wall, 3), "turn_s": round(wall, 3),
               "kv_usage": round(kv, 4)}
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def bench_vllm_chat(model_dir: str, messages: list[str], budget: int, method: str, answer_tokens: int,
                    max_model_len: int, dtype: str, out_dir: str,
                    on_row: Callable[[dict], None] | None = None,
                    servers=CHAT_SERVERS) -> list[dict]:
    """The conversation ``messages`` through each server of ``servers``, one after the other."""
    rows = []
    for label, lacache, prefix_caching in servers:
        settings = None if lacache is None else {"method": method, "budget": budget, **lacache}
        log = os.path.join(out_dir, f"vllm_chat_{label}.log")
        with _server(model_dir, settings, prefix_caching, max_model_len, dtype, log) as base:
            rows += _conversation(base, label, messages, answer_tokens, on_row)
    return rows
