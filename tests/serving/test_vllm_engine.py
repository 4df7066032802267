"""Engine behaviour with the plugin on (run by `make test-vllm`): sampling with n > 1, stop strings,
aborts, admission by each request's decode row and preemption all work, and every block goes back
to the pool."""

import os

import pytest

pytest.importorskip("vllm")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: the scheduler can be inspected

from streams import spy_preemptions  # noqa: E402

_ENGINES = []  # kept alive: tearing an engine down in-process breaks the next one's process groups


def _engine(budget: int, blocks: int):
    from vllm import LLM

    from lacache.lab.models import default_model_dir

    llm = LLM(model=str(default_model_dir()), dtype="float32", enforce_eager=True, max_model_len=2048,
              enable_prefix_caching=False, gpu_memory_utilization=0.3, num_gpu_blocks_override=blocks,
              max_num_batched_tokens=128, additional_config={"lacache": {"budget": budget}})
    _ENGINES.append(llm)
    return llm


def _scheduler(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def _free_blocks(llm) -> int:
    """Blocks free, or kept for a continuation (``reuse``: given back whenever a request needs them)."""
    manager = _scheduler(llm).kv_cache_manager
    kept = manager.coordinator.single_type_managers[0].kept
    return manager.block_pool.get_num_free_blocks() + sum(len(entry.blocks) for entry in kept.values())


@pytest.fixture(scope="module", autouse=True)
def _bundled_model():
    from lacache import load_model

    load_model(None)  # converts the bundled model once if needed


def test_sampling_stop_strings_and_abort_free_every_block():
    from vllm import SamplingParams

    llm = _engine(budget=64, blocks=6)
    idle = _free_blocks(llm)
    outs = llm.generate(["Once upon a time"], SamplingParams(n=2, max_tokens=150, temperature=0.8, seed=3,
                                                              ignore_eos=True))
    assert [len(c.token_ids) for c in outs[0].outputs] == [150, 150]
    assert outs[0].outputs[0].token_ids != outs[0].outputs[1].token_ids
    stop = llm.generate(["The lighthouse keeper said"], SamplingParams(max_tokens=200, temperature=0, stop=["."]))
    assert stop[0].outputs[0].finish_reason == "stop" and "." not in stop[0].outputs[0].text
    engine = llm.llm_engine
    engine.add_request("aborted", "Write a very long story about the sea.",
                       SamplingParams(max_tokens=500, temperature=0, ignore_eos=True))
    for _ in range(90):  # past its first compaction
        engine.step()
    assert _free_blocks(llm) < idle
    engine.abort_request(["aborted"])
    while engine.has_unfinished_requests():
        engine.step()
    assert _free_blocks(llm) == idle


def _stories(engine, prefix: str, count: int) -> None:
    """Add ``count`` greedy requests of 200 new tokens after a ~100-token story prompt."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=200, min_tokens=200, temperature=0, ignore_eos=True)
    for i in range(count):
        engine.add_request(f"{prefix}{i}", "Story number %d: " % i + "the sea was calm and the night was long. " * 9,
                           params)


def _step(engine, lengths: dict[str, int]) -> None:
    """One engine step; ``lengths`` gets each request's tokens so far."""
    for out in engine.step():
        lengths[out.request_id] = len(out.outputs[0].token_ids)


def test_admission_reserves_the_decode_row_so_no_running_request_is_preempted():

    # budget 192: a request holds up to 193 slots while decoding, two 128-token blocks. It is admitted
    # with both, so four of them in a pool of four blocks run two at a time and none is ever preempted
    # (sized by its current length instead, each would start with one block and the pool would thrash).
    llm = _engine(budget=192, blocks=5)
    scheduler = _scheduler(llm)
    preempted = spy_preemptions(scheduler)
    idle = _free_blocks(llm)
    engine = llm.llm_engine
    _stories(engine, "r", 4)
    running, lengths = [], {}
    while engine.has_unfinished_requests():
        _step(engine, lengths)
        running.append(len(scheduler.running))
    assert preempted == []
    assert max(running) == 2, running
    assert lengths == {f"r{i}": 200 for i in range(4)}
    assert _free_blocks(llm) == idle


def test_preempted_requests_recompute_and_finish_without_leaking_blocks():

    llm = _engine(budget=64, blocks=6)
    scheduler = _scheduler(llm)
    preempted = spy_preemptions(scheduler)
    idle = _free_blocks(llm)
    engine = llm.llm_engine
    _stories(engine, "p", 3)
    lengths: dict[str, int] = {}
    forced = False
    while engine.has_unfinished_requests():
        _step(engine, lengths)
        if not forced and lengths and min(lengths.values()) >= 80:
            # every request is compacting: preempt them all mid-decode (vLLM's own path, as when a pool
            # runs dry); each must restart from token 0 on both the scheduler and the worker
            engine.reset_prefix_cache(reset_running_requests=True)
            forced = True
    assert forced and sorted({rid.split("-")[0] for rid in preempted}) == ["p0", "p1", "p2"]  # vLLM suffixes ids
    assert lengths == {f"p{i}": 200 for i in range(3)}
    assert _free_blocks(llm) == idle
