"""GPU decode benchmark, prepared to run unattended: Llama-3-8B shapes, random bf16 weights, no download.

Decode ms/token and peak GPU memory at several context lengths for the full cache (``DynamicCache``),
``StaticCache``, lacache and StreamingLLM, eager (the default caches) and compiled with CUDA graphs
(``mode="reduce-overhead"``; the bounded caches with ``static=True``). Needs only torch, transformers and lacache's own source (this checkout's
``src/`` is put on the path), so it runs on a machine without network. Writes one JSON and prints a
markdown table; each setup is timed as soon as it is built, and the JSON is rewritten after every
setup, so an interrupted run keeps what it measured.

    python scripts/gpu_bench.py --out gpu_bench.json              # an H200: under 8 minutes
    python scripts/gpu_bench.py --smoke --out /tmp/smoke.json     # any CPU: a tiny model, seconds

The bounded caches hold ``--budget`` slots whatever the context, so their memory and step time stay
flat while the full and static caches grow with it. Compiled setups are warmed up (compiled and their
graphs captured) before timing; the warm-up time is reported apart.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import torch  # noqa: E402
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache  # noqa: E402

from lacache import make_cache  # noqa: E402

#: Llama-3-8B's shapes (its published config), with random weights
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                 rope_theta=500000.0, rms_norm_eps=1e-5)
#: a model small enough for a CPU, same structure
SMOKE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0)


def build_model(shapes: dict, dtype: torch.dtype, device: str):
    config = LlamaConfig(**shapes, attn_implementation="sdpa")
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_bytes(device: str) -> int | None:
    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else None


def prefill(model, cache, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Feed ``ids`` in chunks (a long context in one pass would need its whole attention at once); the next token."""
    with torch.no_grad():
        for start in range(0, ids.shape[1], chunk):
            piece = ids[:, start:start + chunk]
            positions = torch.arange(start, start + piece.shape[1], device=ids.device)[None]
            out = model(input_ids=piece, cache=cache, position_ids=positions, logits_to_keep=1)
    return out.logits[:, -1:].argmax(-1)


def decode(call, cache, token: torch.Tensor, position: int, steps: int) -> tuple[torch.Tensor, int]:
    with torch.no_grad():
        for _ in range(steps):
            out = call(input_ids=token, cache=cache, position_ids=torch.tensor([[position]], device=token.device))
            token = out.logits[:, -1:].argmax(-1)
            position += 1
    return token, position


def run(args) -> dict:
    device = "cpu" if args.smoke else args.device
    dtype = torch.float32 if args.smoke else torch.bfloat16
    shapes = SMOKE if args.smoke else LLAMA3_8B
    contexts = [int(c) for c in args.contexts.split(",")]
    started = time.perf_counter()
    model = build_model(shapes, dtype, device)
    mode = None if args.smoke else "reduce-overhead"
    backend = "aot_eager" if args.smoke else "inductor"
    # each StaticCache length compiles its own static graph; the bounded caches' shapes do not depend on the
    # context, so their graphs (and CUDA graphs) are compiled once and reused for every context
    torch._dynamo.config.automatic_dynamic_shapes = False
    torch._dynamo.config.cache_size_limit = max(16, torch._dynamo.config.cache_size_limit)
    compiled = torch.compile(model, fullgraph=True, backend=backend, mode=mode)
    generator = torch.Generator().manual_seed(0)
    result = {"benchmark": "gpu_decode", "shapes": shapes, "dtype": str(dtype), "device": device,
              "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "budget": args.budget, "steps": args.steps, "mode": mode,
              "backend": backend, "rows": []}
    setups = [("full", False), ("StaticCache", False), ("StaticCache", True),
              ("lacache", False), ("lacache", True), ("streaming", False), ("streaming", True)]
    for context in contexts:
        ids = torch.randint(0, shapes["vocab_size"], (1, context), generator=generator).to(device)
        for name, use_compile in setups:
            if name == "full" and context > args.full_limit:
                continue
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            if name == "full":
                cache = DynamicCache(config=model.config)
            elif name == "StaticCache":
                cache = StaticCache(config=model.config, max_cache_len=context + args.warmup + args.steps + 1)
            else:
                cache = make_cache(name, model, args.budget, static=use_compile)  # eager: the default cache
            call = compiled if use_compile else model
            sync(device)
            t0 = time.perf_counter()
            token = prefill(model, cache, ids, args.prefill_chunk)
            sync(device)
            t1 = time.perf_counter()
            token, position = decode(call, cache, token, context, args.warmup)
            sync(device)
            t2 = time.perf_counter()
            decode(call, cache, token, position, args.steps)
            sync(device)
            t3 = time.perf_counter()
            row = {"context": context, "cache": name, "compiled": use_compile, "prefill_s": t1 - t0,
                   "warmup_s": t2 - t1, "ms_per_token": 1000 * (t3 - t2) / args.steps,
                   "peak_gib": None if peak_bytes(device) is None else peak_bytes(device) / 2**30}
            result["rows"].append(row)
            print(f"{context:>6} {name:>11} {'compiled' if use_compile else 'eager':>8}: "
                  f"{row['ms_per_token']:8.2f} ms/token, warm-up {row['warmup_s']:6.1f} s", file=sys.stderr, flush=True)
            result["seconds"] = time.perf_counter() - started
            if args.out:
                with open(args.out, "w") as fh:
                    json.dump(result, fh, indent=2)
            del cache
    return result


def table(result: dict) -> str:
    lines = ["| context | cache | compiled | ms/token | peak GiB | warm-up s |", "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        peak = "" if row["peak_gib"] is None else f"{row['peak_gib']:.1f}"
        lines.append(f"| {row['context']} | {row['cache']} | {'yes' if row['compiled'] else 'no'} | "
                     f"{row['ms_per_token']:.2f} | {peak} | {row['warmup_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU (checks the script runs)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--contexts", default=None, help="comma-separated (default 4096,16384,65536; smoke: 64,128)")
    parser.add_argument("--budget", type=int, default=None, help="slots per layer of lacache/streaming (default 2048)")
    parser.add_argument("--steps", type=int, default=None, help="timed decode steps per setup (default 64)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, graph capture)")
    parser.add_argument("--prefill-chunk", type=int, default=4096)
    parser.add_argument("--full-limit", type=int, default=1 << 20, help="skip the full cache above this context")
    parser.add_argument("--out", default="gpu_bench.json")
    args = parser.parse_args(argv)
    args.contexts = args.contexts or ("64,128" if args.smoke else "4096,16384,65536")
    args.budget = args.budget or (32 if args.smoke else 2048)
    args.steps = args.steps or (4 if args.smoke else 64)
    if args.smoke:
        args.prefill_chunk = min(args.prefill_chunk, 48)
    result = run(args)
    print(table(result))
    return result


if __name__ == "__main__":
    main()
