"""The KV pool of an engine with the plugin (lacache.vllm.pool), on real engines: sized for the bounded rows when
the user gives no size, and a pool too small for one peak row refused before the model loads, in one line that
names the budget (and for the authors' schedule the chunk; vLLM's own check would advise a shorter
max_model_len)."""

import functools
import os

import pytest

pytest.importorskip("vllm")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

_ENGINES = []


def _settings(method: str = "lacache-capped", **more):
    from lacache.lab.models import default_model_dir

    return dict(model=str(default_model_dir()), dtype="float32", enforce_eager=True, max_model_len=4096,
                additional_config={"lacache": {"method": method, "budget": 255}}, **more)


@pytest.mark.parametrize("size", [{"num_gpu_blocks_override": 4}, {"kv_cache_memory_bytes": 10 * 5898240}])
def test_a_pool_too_small_for_one_peak_row_is_refused_naming_budget_and_chunk(size, monkeypatch):
    """The authors' schedule (no compaction points) holds its capacity plus a whole prefill chunk at its peak: the
    line names the chunk to lower, and the chunk it suggests starts. The serving default's peak row is its decode
    row (2 blocks here), which these pools hold."""
    from vllm.engine.arg_utils import EngineArgs

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)  # it would replace kv_cache_memory_bytes
    EngineArgs(**_settings(max_num_batched_tokens=2048, **size)).create_engine_config()
    authors = functools.partial(_settings, "lacache")
    with pytest.raises(ValueError) as refused:
        EngineArgs(**authors(max_num_batched_tokens=2048, **size)).create_engine_config()
    message = str(refused.value)
    assert message.startswith("lacache: the KV pool holds") and "\n" not in message
    assert "budget 255" in message and "prefill chunk of 2048 tokens" in message
    # the chunk it suggests starts
    suggested = message.split("e.g. --max-num-batched-tokens ")[1].split(")")[0].split()
    chunk = int(suggested[0])
    seqs = int(suggested[2]) if len(suggested) > 1 else None
    EngineArgs(**authors(max_num_batched_tokens=chunk, **({"max_num_seqs": seqs} if seqs else {}),
                         **size)).create_engine_config()


def test_a_pool_too_small_for_one_decode_row_is_refused_naming_the_budget(monkeypatch):
    """With compaction points no prefill chunk adds to a request's row: only a pool smaller than the decode row
    (budget 255 + 1 = 2 blocks of 128) is refused, whatever max_num_batched_tokens is."""
    from vllm.engine.arg_utils import EngineArgs

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    with pytest.raises(ValueError) as refused:
        EngineArgs(**_settings(max_num_batched_tokens=2048, num_gpu_blocks_override=2)).create_engine_config()
    message = str(refused.value)
    assert message.startswith("lacache: the KV pool holds 1 usable block(s)") and "\n" not in message
    assert "budget 255" in message and "256 slots = 2 blocks" in message and "--num-gpu-blocks-override 3" in message
    EngineArgs(**_settings(max_num_batched_tokens=2048, num_gpu_blocks_override=3)).create_engine_config()


def test_without_a_size_the_pool_holds_max_num_seqs_bounded_rows(monkeypatch):
    from vllm import LLM, SamplingParams

    from lacache.vllm.pool import plan_pool
    from lacache.vllm.worker import states

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    llm = LLM(**_settings(max_num_seqs=8, max_num_batched_tokens=256))
    _ENGINES.append(llm)
    config = llm.llm_engine.vllm_config
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    blocks = scheduler.kv_cache_manager.block_pool.num_gpu_blocks
    plan = plan_pool(config._lacache_parsed, config, 1 << 50)  # this machine has room for all 8 rows
    assert config.cache_config.kv_cache_memory_bytes == plan.nbytes
    # 8 rows of 256 slots (255 held + the token being computed: passes stop at compaction points, so a prefill
    # chunk needs no more), vLLM's null block
    assert blocks == plan.blocks + 1 == 8 * 2 + 1
    # the page layout was measured at start, before any request (an unreadable one is refused there)
    assert states()[-1]._paged is not None and states()[-1].compactions == 0
    outs = llm.generate([{"prompt_token_ids": list(range(100 + i, 400 + i))} for i in range(8)],
                        SamplingParams(max_tokens=300, min_tokens=300, temperature=0, ignore_eos=True), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 300 for o in outs)
    assert states()[-1].compactions > 0
