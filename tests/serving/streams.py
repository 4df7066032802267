"""Helpers the vLLM tests share: the transformers side of a stream fed in vLLM's passes, and a spy on
vLLM's preemptions."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

#: the prompts of the token tests (4, 31 and 73 tokens with the bundled tokenizer), float32 and half precision
PROMPTS = ["Once upon a time", "The history of the lighthouse begins with a keeper who " * 3,
           "Write a long story about a dragon. " * 9]


# ------------------------------------------------------------------------------ models
def save_tiny_llama(path: str, layers: int = 4):
    """A tiny random Llama over the bundled tokenizer's vocabulary, saved with that tokenizer to ``path`` (where a
    vLLM engine can load it); returns (model, tokenizer).

    Why the exactness tests use it: a check that vLLM keeps and shifts exactly what the transformers cache keeps
    compares which tokens every layer holds and the greedy tokens, neither of which needs trained weights; the
    bundled model's decode costs 130 ms a token on 2 cores, this one's a few. Head size 32 (the smallest the CPU
    attention backend takes), grouped-query attention as in the bundled model, tied embeddings; wider weights
    than the default init (0.1) make the logits peaked, so rounding in the two backends' kernels never flips a
    greedy pick. It declares no end of sequence: ask vLLM with ``ignore_eos`` and without ``min_tokens``, which
    masks the tokenizer's end-of-sequence token that the transformers side may pick."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lacache.lab.models import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                         max_position_embeddings=4096, tie_word_embeddings=True, initializer_range=0.1)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None  # random weights: never stop early
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer


@pytest.fixture(scope="module")
def bundled():
    """The bundled SmolLM2: (model in float32, tokenizer, its folder)."""
    from lacache import load_model
    from lacache.lab.models import default_model_dir

    model, tokenizer = load_model(None)
    return model, tokenizer, default_model_dir()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """:func:`save_tiny_llama`'s model: (model, tokenizer, its folder)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    model, tokenizer = save_tiny_llama(str(folder))
    return model, tokenizer, folder


def greedy_params(model, new: int):
    """vLLM's greedy request for ``new`` tokens that ``model``'s transformers run can match: ``min_tokens`` (which
    masks end-of-sequence in vLLM, as ``min_new_tokens`` does in transformers) only where the model declares one."""
    from vllm import SamplingParams

    stops = model.generation_config.eos_token_id is not None
    return SamplingParams(max_tokens=new, min_tokens=new if stops else 0, temperature=0, ignore_eos=True)


def greedy_turn(model, cache, ids: list[int], new: int, most: int | None = None) -> list[int]:
    """Feed ``ids`` to ``cache`` in passes of at most ``most`` tokens (default: as many as the cache's compaction
    points allow, ``generation.prefill_passes``), then ``new`` greedy tokens one pass each, the last one not fed
    (as vLLM leaves a finished request: its final sampled token never gets a KV slot)."""
    from lacache.cache.generation import next_positions, prefill_passes

    out = []
    with torch.no_grad():
        logits = None
        for start, length in prefill_passes(cache, len(ids), most or len(ids)):
            x = torch.tensor([ids[start:start + length]])
            logits = model(input_ids=x, position_ids=next_positions(cache, length, "cpu"),
                           past_key_values=cache).logits[0, -1]
        for step in range(new):
            out.append(int(logits.argmax()))
            if step == new - 1:
                break
            x = torch.tensor([[out[-1]]])
            logits = model(input_ids=x, position_ids=next_positions(cache, 1, "cpu"),
                           past_key_values=cache).logits[0, -1]
    return out


def spy_preemptions(scheduler) -> list[str]:
    """The ids of the requests ``scheduler`` preempts from now on (vLLM's own preemption path still runs)."""
    preempted = []
    original = scheduler._preempt_request

    def spy(request, *args, **kwargs):
        preempted.append(request.request_id)
        return original(request, *args, **kwargs)

    scheduler._preempt_request = spy
    return preempted


# ------------------------------------------------------------------------------ half precision
#: how far, in spacings of the row's largest logit (in magnitude) in the model's dtype, vLLM's logprob of its token may be from the
#: transformers cache's, and its token's logprob from the transformers argmax's. Why not bitwise: vLLM's CPU
#: kernels (matmuls, attention, norms) add in another order than torch's, and in half precision every layer
#: rounds to 8 (bfloat16) or 11 (float16) significant bits, so the two forwards differ by a few spacings of
#: the logits before any compaction (a logit of 20 is a multiple of 0.125 in bfloat16); and vLLM stores keys
#: rotated, so each compaction that moves a key rounds it once more (transformers' half-precision cache
#: stores keys un-rotated and rounds each once). A misplaced or unturned key costs whole nats.
SPACINGS = 4


def spacing(logit: float, dtype) -> float:
    """The distance between ``dtype`` numbers near ``logit``."""
    import math

    return torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(max(abs(logit), 1e-3)))


def forced_turn(model, cache, ids: list[int], tokens: list[int]) -> list[torch.Tensor]:
    """Feed ``ids`` in passes that end at the cache's compaction points, then ``tokens`` one pass each, the last one
    not fed (as ``greedy_turn``, but the tokens are given: vLLM's); the logits before each token, in float32."""
    from lacache.cache.generation import next_positions, prefill_passes

    rows = []
    with torch.no_grad():
        for start, length in prefill_passes(cache, len(ids), len(ids)):
            x = torch.tensor([ids[start:start + length]])
            logits = model(input_ids=x, position_ids=next_positions(cache, length, "cpu"),
                           past_key_values=cache).logits[0, -1].float()
        for j, token in enumerate(tokens):
            rows.append(logits)
            if j == len(tokens) - 1:
                break
            logits = model(input_ids=torch.tensor([[token]]), position_ids=next_positions(cache, 1, "cpu"),
                           past_key_values=cache).logits[0, -1].float()
    return rows


def assert_close(rows: list[torch.Tensor], tokens: list[int], logprobs: list[float] | None, dtype, where="",
                 suppressed=()) -> float:
    """vLLM's ``tokens`` (and their raw ``logprobs``) against the transformers cache's logits ``rows`` in the same
    ``dtype``: each token is, within ``SPACINGS`` spacings of the largest logit (in magnitude), a greedy pick of the transformers
    cache (``suppressed`` ids, EOS under ``min_tokens``, are never picked), and its logprob is as close. Returns
    the largest difference seen, in spacings."""
    worst = 0.0
    for j, (row, token) in enumerate(zip(rows, tokens)):
        tol = SPACINGS * spacing(float(row.abs().max()), dtype)
        lp = torch.log_softmax(row, -1)
        pickable = lp.clone()
        pickable[list(suppressed)] = float("-inf")
        gap = float(pickable.max() - lp[token])
        diff = abs(float(lp[token]) - logprobs[j]) if logprobs is not None else 0.0
        assert gap <= tol and diff <= tol, (where, j, gap, diff, tol)
        worst = max(worst, gap / tol * SPACINGS, diff / tol * SPACINGS)
    return worst


# ------------------------------------------------------------------------------ endless sessions
def session_chunks(tokenizer, inputs: int = 50) -> list[list[int]]:
    """The inputs of the streaming-session tests: 9 words of the essays each."""
    from lacache.lab.texts import load_essays

    words = load_essays(60_000).split()
    return [tokenizer(" " + " ".join(words[9 * i: 9 * i + 9]))["input_ids"] for i in range(inputs)]


def run_session(settings: dict) -> dict:
    """Run session_check.py (a streaming session through AsyncLLM, in a child process) with ``settings``; its
    result."""
    run = subprocess.run([sys.executable, str(Path(__file__).with_name("session_check.py")), json.dumps(settings)],
                         env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}, capture_output=True, text=True,
                         timeout=1200)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    return json.loads(lines[0][len("RESULT "):])
