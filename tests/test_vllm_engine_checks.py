"""The plugin's refusal tables and its key rotation, without vLLM (``lacache.vllm.engine_checks``,
``lacache.vllm.worker._pure_rotations``): configs are stand-ins with vLLM's attribute names."""

from types import SimpleNamespace

import pytest
import torch

from lacache.vllm.engine_checks import (
    REFUSALS,
    REQUEST_REFUSALS,
    engine_refusals,
    request_refusal,
    rope_types,
)


def _config(**model):
    text = SimpleNamespace(rope_parameters=model.pop("rope", {"rope_type": "default", "rope_theta": 1e4}))
    settings = dict(hf_text_config=text, dtype=torch.float32, enable_prompt_embeds=False, enforce_eager=True, is_multimodal_model=False,
                    uses_mrope=False, use_mla=False, is_hybrid=False, get_sliding_window=lambda: None)
    settings.update(model)
    return SimpleNamespace(model_config=SimpleNamespace(**settings), speculative_config=None,
                           cache_config=SimpleNamespace(cache_dtype="auto", kv_offloading_size=None),
                           kv_transfer_config=None, lora_config=None,
                           parallel_config=SimpleNamespace(pipeline_parallel_size=1, data_parallel_size=1),
                           scheduler_config=SimpleNamespace(policy="fcfs"))


def test_engine_refusals_read_the_config():
    args = SimpleNamespace(async_scheduling=None)
    assert engine_refusals(args, _config()) == []
    for dtype in (torch.bfloat16, torch.float16):  # half-precision pages are served (tests/serving/test_vllm_dtypes.py)
        assert engine_refusals(args, _config(dtype=dtype)) == []
    for model, option in [({"is_multimodal_model": True}, "a multimodal model"),
                          ({"uses_mrope": True}, "a multimodal model"),
                          ({"get_sliding_window": lambda: 4096}, "a sliding-window, hybrid or MLA model"),
                          ({"use_mla": True}, "a sliding-window, hybrid or MLA model"),
                          ({"rope": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling / rope_parameters"),
                          ({"rope": {"full_attention": {"rope_type": "default"}, "sliding_attention":
                                     {"rope_type": "longrope"}}}, "rope_scaling / rope_parameters"),
                          ({"enforce_eager": False}, "--no-enforce-eager (compiled model)")]:
        found = engine_refusals(args, _config(**model))
        assert len(found) == 1 and found[0].startswith(f"lacache: {option} is not served"), (model, found)
    assert engine_refusals(SimpleNamespace(async_scheduling=True), _config())[0].startswith(
        "lacache: --async-scheduling")
    for refusal in REFUSALS:
        assert "\n" not in refusal.message() and refusal.message().count(";") >= 1
    # a key-norm rule in half precision: its slot choice would not be the transformers cache's
    # named no method, a half-precision engine gets its own serving default (lacache-capped, index-only), never a
    # refusal; a float32 engine gets keydiff
    for method, dtype, refused in [("knorm", torch.bfloat16, True), ("lacache-group", torch.float16, True),
                                   ("lacache-salient", torch.float32, False), ("lacache-capped", torch.bfloat16, False),
                                   (None, torch.bfloat16, False), (None, torch.float16, False),
                                   (None, torch.float32, False)]:
        config = _config(dtype=dtype, hf_text_config=SimpleNamespace(num_hidden_layers=30,
                                                                     rope_parameters={"rope_type": "default"}))
        config.additional_config = {"lacache": {"budget": 256} if method is None else {"method": method, "budget": 256}}
        found = engine_refusals(args, config)
        assert (found == ["lacache: a key-reading method (knorm, keydiff, lacache-salient, lacache-group) in bfloat16 or "
                          "float16 is not served with a bounded KV cache: half-precision keys move the key statistic "
                          "across the 8-bit values the rule ranks by, so it would keep other slots than the "
                          "transformers cache (1.3% of lacache-group's, fed the same tokens; docs/serving.md); serve "
                          "it with --dtype float32 (lacache serve's default), or name no method (lacache-capped in "
                          "half precision)"]) == refused, (method, dtype, found)
        if method is None:  # what the workers and the scheduler will serve
            from lacache.vllm.config import serving_config

            want = "keydiff" if dtype == torch.float32 else "lacache-capped"
            assert serving_config(config).method == want, (dtype, serving_config(config).method)


def test_rope_types_of_flat_and_nested_parameters():
    assert rope_types(SimpleNamespace()) == ["default"]
    assert rope_types(SimpleNamespace(rope_parameters={"rope_type": "yarn", "factor": 4.0})) == ["yarn"]
    assert rope_types(SimpleNamespace(rope_scaling={"type": "linear", "factor": 2.0})) == ["linear"]
    nested = {"full_attention": {"rope_type": "default"}, "sliding_attention": {"rope_type": "linear"}}
    assert rope_types(SimpleNamespace(rope_parameters=nested)) == ["default", "linear"]


def test_request_refusals_trip_only_on_a_set_parameter():
    unset = SimpleNamespace(**{refusal.parameter: None for refusal in REQUEST_REFUSALS})
    assert request_refusal(unset) is None
    for refusal in REQUEST_REFUSALS:
        params = SimpleNamespace(**{r.parameter: None for r in REQUEST_REFUSALS})
        setattr(params, refusal.parameter, 1)
        assert request_refusal(params) is refusal


@pytest.mark.parametrize("mscale", [1.0, 1.2772588722239781])
def test_moved_keys_turn_by_pure_rotations(mscale):
    """A table with YaRN's attention factor folded in turns keys exactly as the plain table does."""
    from lacache.rope import rotate_half
    from lacache.vllm.worker import _pure_rotations

    dim, positions = 8, 50
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = torch.arange(positions, dtype=torch.float32)[:, None] * inv[None]
    plain = torch.cat([angles.cos(), angles.sin()], dim=-1)
    table = _pure_rotations(plain * mscale)
    assert torch.allclose(table, plain, atol=1e-6)
    keys = torch.randn(5, 2, dim)
    delta = torch.tensor([3, 7, 0, 12, 30])
    turned = rotate_half(keys, table[delta][:, None, : dim // 2], table[delta][:, None, dim // 2:])
    assert torch.allclose(turned.norm(dim=-1), keys.norm(dim=-1), atol=1e-5)  # a rotation: lengths unchanged
