"""The KV pool the plugin gives an engine (``lacache.vllm.pool``): sized for the bounded rows, refused in one line
when it cannot hold one request's peak row. Torch-free arithmetic on stand-in configs; the engines that start
with it are in tests/serving/test_vllm_pool_engine.py."""

from types import SimpleNamespace

import pytest
import torch

from lacache.vllm.config import parse_config
from lacache.vllm.pool import GIB, MAX_SHARE, bytes_per_block, plan_pool, pool_refusal, user_sized


def _vllm(block=128, heads=3, dim=64, layers=30, dtype=torch.float32, seqs=128, step=2048, max_len=8192,
          memory_bytes=None, override=None, utilization=0.92):
    model = SimpleNamespace(dtype=dtype, max_model_len=max_len, get_num_kv_heads=lambda p: heads,
                            get_num_layers=lambda p: layers, get_head_size=lambda: dim)
    return SimpleNamespace(model_config=model, parallel_config=None,
                           cache_config=SimpleNamespace(block_size=block, kv_cache_memory_bytes=memory_bytes,
                                                        num_gpu_blocks_override=override,
                                                        gpu_memory_utilization=utilization),
                           scheduler_config=SimpleNamespace(max_num_seqs=seqs, max_num_batched_tokens=step))


def test_a_block_holds_keys_and_values_of_every_layer():
    assert bytes_per_block(_vllm()) == 2 * 128 * 3 * 64 * 4 * 30
    assert bytes_per_block(_vllm(dtype=torch.bfloat16)) == 2 * 128 * 3 * 64 * 2 * 30


@pytest.mark.parametrize("budget", [64, 255, 256, 1023])
@pytest.mark.parametrize("step", [128, 2048])
@pytest.mark.parametrize("method", ["lacache-capped", "streaming", "lacache"])
def test_the_pool_holds_max_num_seqs_decode_rows_and_one_peak_row(budget, step, method):
    """A rule with compaction points never holds more than its decode row (passes stop at the points); the authors'
    schedule (``lacache``) holds its capacity plus a whole prefill chunk at its peak."""
    config = parse_config({"method": method, "budget": budget}, 30)
    vllm = _vllm(step=step)
    plan = plan_pool(config, vllm, available_bytes=1 << 50)
    decode = -(-(config.capacity + 1) // 128)
    peak = decode if method != "lacache" else -(-(config.capacity + step) // 128)
    assert (plan.decode_blocks, plan.peak_blocks, plan.requests) == (decode, peak, 128)
    assert plan.blocks == peak + 127 * decode
    assert plan.nbytes == (plan.blocks + 1) * bytes_per_block(vllm)  # vLLM's null block on top
    assert pool_refusal(config, vllm, plan.blocks) is None
    assert f"{plan.nbytes / GIB:.2f} GiB" in plan.line() and "128 decoding requests" in plan.line()
    assert ("passes stop at every compaction point" in plan.line()) == (peak == decode)


def test_a_small_machine_gets_fewer_rows_never_less_than_one_peak_row():
    config = parse_config({"method": "lacache", "budget": 255}, 30)
    vllm = _vllm()
    per_block = bytes_per_block(vllm)
    plan = plan_pool(config, vllm, available_bytes=int(60 * per_block / MAX_SHARE))
    assert plan.requests < 128 and plan.blocks + 1 <= 60 and plan.peak_blocks + (plan.requests - 1) * plan.decode_blocks == plan.blocks
    assert "max_num_seqs is 128" in plan.line()
    tiny = plan_pool(config, vllm, available_bytes=per_block)
    assert tiny.requests == 1 and tiny.blocks == tiny.peak_blocks


def test_a_pool_smaller_than_one_row_is_refused_naming_the_budget():
    """With compaction points the peak row is the decode row, whatever the prefill chunk: the line says so."""
    config = parse_config({"method": "lacache-capped", "budget": 255}, 30)
    for step in (128, 2048):
        vllm = _vllm(step=step)
        assert pool_refusal(config, vllm, 2) is None
        message = pool_refusal(config, vllm, 1)
        assert message is not None and "\n" not in message
        for words in ("budget 255", "256 slots = 2 blocks", "--num-gpu-blocks-override 3", "prefill chunk adds none"):
            assert words in message, words


def test_a_pool_smaller_than_one_peak_row_is_refused_naming_budget_and_chunk():
    config = parse_config({"method": "lacache", "budget": 255}, 30)
    vllm = _vllm(step=2048)
    peak = -(-(config.capacity + 2048) // 128)
    message = pool_refusal(config, vllm, peak - 1)
    assert message is not None and "\n" not in message
    for words in ("budget 255", "prefill chunk of 2048 tokens", "--max-num-batched-tokens", f"{peak} blocks",
                  f"--num-gpu-blocks-override {peak + 1}", "max_model_len does not matter"):
        assert words in message, words
    assert pool_refusal(config, vllm, peak) is None
    # the suggested chunk fits the pool it was refused for
    for blocks in (peak - 1, 3):
        suggested = pool_refusal(config, vllm, blocks).split("e.g. --max-num-batched-tokens ")[1].split(")")[0].split()
        chunk = int(suggested[0])
        # vLLM needs a chunk of at least max_num_seqs (128 here): a smaller one comes with a smaller max_num_seqs
        assert suggested[1:] == ([] if chunk >= 128 else ["--max-num-seqs", str(chunk)])
        assert pool_refusal(config, _vllm(step=chunk), blocks) is None


def test_the_user_sizes_the_pool_with_any_of_vllms_settings():
    assert not user_sized(_vllm())
    assert user_sized(_vllm(memory_bytes=GIB)) and user_sized(_vllm(override=8)) and user_sized(_vllm(utilization=0.5))
    assert user_sized(_vllm(), SimpleNamespace(gpu_memory_utilization=0.3))
    assert not user_sized(_vllm(), SimpleNamespace(gpu_memory_utilization=0.92))
