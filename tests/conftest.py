"""Shared test helpers, and the two tiers of the suite.

``make test`` (``pytest -q``) runs everything, as CI does. The suite is split by the ``integration``
marker so a developer can run the quick part alone:

* **unit** (``make test-unit`` = ``pytest -m "not integration"``): tiny random models in this
  process (some take the bundled tokenizer, whose first use converts the bundled GGUF once into
  ``$LACACHE_HOME``); about 3 minutes on 2 cores.
* **integration** (``make test-integration`` = ``pytest -m integration``): the real bundled models'
  weights (SmolLM2 through ``load_model()``, Gemma 3 270M) and everything that launches processes
  (torchrun / accelerate launch, CLI runs interrupted by SIGINT, Chromium, vLLM engines and servers).

A test is integration when it carries the marker itself (``pytestmark`` of its module, or a
decorator: the way to mark a test that loads a model or launches a process inline), when it lives
in one of :data:`INTEGRATION_PATHS`, or when it uses one of :data:`INTEGRATION_FIXTURES`, directly
or through another fixture; :func:`pytest_collection_modifyitems` applies the last two, so that a new
test using e.g. ``cached_pair`` lands in the right tier without anyone remembering to mark it.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(min(2, torch.get_num_threads()))

#: Fixtures that load a real model's weights or launch processes: a test using one is integration.
INTEGRATION_FIXTURES = frozenset({
    "smol",  # test_integration: load_model(), the bundled SmolLM2
    "cached_pair", "gguf_pair",  # test_models: the bundled SmolLM2 from its folder and from its GGUF
    "gemma",  # test_second_model: Gemma 3 270M
    "launched",  # test_distributed: two `torchrun --nproc-per-node 2` launches
    "interrupted",  # test_interrupt_resume: CLI commands in a subprocess, stopped by SIGINT
    "bundled", "_bundled_model",  # serving/: vLLM engines on the bundled model
})

#: Paths under tests/ (prefixes) whose every test is integration: they start Chromium or a vLLM engine
#: (serving/test_vllm_*; serving/'s other tests need no vLLM and stay unit), or exist for the real models.
INTEGRATION_PATHS = ("browser/", "serving/test_vllm_", "test_integration.py", "test_readme.py", "test_second_model.py")

_TESTS = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark as ``integration`` the tests in :data:`INTEGRATION_PATHS` or using :data:`INTEGRATION_FIXTURES`."""
    for item in items:
        where = os.path.relpath(str(item.path), _TESTS).replace(os.sep, "/")
        if where.startswith(INTEGRATION_PATHS) or INTEGRATION_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


def tiny_llama(attn: str = "sdpa", layers: int = 4, seed: int = 0, dtype=torch.float32, **overrides):
    """A random Llama small enough that a 2,000-step stream takes seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        rope_theta=10000.0,
        attn_implementation=attn,
    )
    settings.update(overrides)
    config = LlamaConfig(**settings)
    model = LlamaForCausalLM(config).eval()
    # Random init is nearly uniform attention; sharpen it so position errors would show in the logits.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    return model.to(dtype)


@pytest.fixture(params=["sdpa", "eager"])
def attn(request):
    return request.param


def generate_like_full_cache(model, ids, cache, max_new_tokens: int = 24) -> tuple[bool, float]:
    """Greedy generate with ``cache`` and with a DynamicCache: (same tokens?, worst |logit diff|)."""
    from transformers import DynamicCache

    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        full = model.generate(ids, cache=DynamicCache(config=model.config), **kwargs)
        ours = model.generate(ids, cache=cache, **kwargs)
    worst = max((a - b).abs().max().item() for a, b in zip(full.logits, ours.logits))
    return torch.equal(full.sequences, ours.sequences), worst


def bundled_tokenizer_and_tiny_model(layers: int = 4):
    """The bundled model's tokenizer (chat template included) and a tiny random Llama over its vocabulary;
    skips the test if the bundled model package is missing."""
    from transformers import AutoTokenizer

    from lacache.lab.models import default_model_dir

    try:
        tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return tokenizer, tiny_llama(layers=layers, vocab_size=len(tokenizer))


# The retention-policy contract takes a LayerView; these two drive a policy the way the cache does,
# from hand-made keys / attention, so tests of the selection rules read as "observe, then select".
_LAST_SEEN: dict = {}


def policy_observe(policy, layer: int, keys=None, probs=None, q: int = 1) -> None:
    """Show ``policy`` one forward pass of ``layer`` (stored ``keys`` and/or attention ``probs``)."""
    from lacache.policies import LayerView

    n = (keys if keys is not None else probs).shape[-2 if keys is not None else -1]
    _LAST_SEEN[id(policy), layer] = (keys, probs, q, n)
    if policy.observes_every_step:
        policy.observe(LayerView(layer, n, q, 0, keys, None if probs is None else (lambda: probs)))


def policy_select(policy, layer: int, target: int, step: int = 0):
    """The ``[B, m]`` slots ``policy`` keeps of what ``policy_observe`` last showed it for ``layer``."""
    from lacache.policies import LayerView

    keys, probs, q, n = _LAST_SEEN[id(policy), layer]
    return policy.retain(LayerView(layer, n, q, step, keys, None if probs is None else (lambda: probs)), target).index


@pytest.fixture(autouse=True)
def _registry_restored():
    """Methods a test registers (``--variant``, ``registry.variant``) do not leak into later tests."""
    from lacache import registry

    saved = dict(registry._BY_NAME), registry.METHODS
    yield
    registry._BY_NAME.clear()
    registry._BY_NAME.update(saved[0])
    registry.METHODS = saved[1]


def save_tiny_model(path, layers: int = 2):
    """Save a tiny random Llama with the bundled tokenizer into ``path``, so ``--model path`` runs the CLI
    end to end in seconds with nothing downloaded; skips the test if the bundled model package is missing."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lacache.lab.models import default_model_dir

    try:
        tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    except FileNotFoundError as err:
        pytest.skip(str(err))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny 2-layer model (``save_tiny_model``), one per test module."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def one_thread():
    """Compute on one thread, as launched subprocesses do, so their numbers match these bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
