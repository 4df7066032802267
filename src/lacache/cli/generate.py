"""``lacache generate``: stream text from a prompt through a fixed-size cache and report its memory."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..lab.evaluation.checkpoint import atomic_write, check_output_file
from ..registry import METHODS, default_method, method_spec, option_names
from . import values
from .common import (
    add_dtype_argument,
    add_model_argument,
    add_option_argument,
    load_model_for,
    note_if_nothing_evicted,
    parse_method_options,
    positive_int,
)

__all__ = ["DEFAULT_PROMPT", "add_parser", "cache_options", "run_cli"]

DEFAULT_PROMPT = (
    "Write a long, detailed story about a lighthouse keeper who finds a mysterious map, "
    "with many chapters, characters and places."
)
#: options with their own flags; given to the cache only when set, so each method keeps its defaults
_FLAGS = ("sinks", "span", "overlap")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``generate`` on the top-level sub-parsers; returns its parser."""
    gen = subparsers.add_parser(
        "generate",
        help="stream text from a prompt with a fixed-size cache (defaults: bundled SmolLM2-135M, 2,000 tokens)",
    )
    add_model_argument(gen)
    gen.add_argument("--method", choices=METHODS, default=default_method())
    gen.add_argument("--budget", type=positive_int, default=256, help="cache slots per layer")
    gen.add_argument("--sinks", type=int, default=None, help="leading slots never evicted (method default if unset)")
    gen.add_argument("--span", type=int, default=None, help="lacache: ladder span (default from the model)")
    gen.add_argument("--overlap", type=int, default=None, help="lacache: ladder overlap (default from the model)")
    gen.add_argument("--max-new-tokens", type=positive_int, default=2000)
    gen.add_argument("--prompt", default=DEFAULT_PROMPT)
    gen.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    gen.add_argument("--stop-at-eos", action="store_true", help="stop at end-of-sequence (default: keep going)")
    gen.add_argument("--temperature", type=float, default=0.7)
    gen.add_argument("--top-p", type=float, default=0.9)
    gen.add_argument("--seed", type=int, default=0)
    add_dtype_argument(gen)
    gen.add_argument("--quiet", action="store_true", help="do not print the generated text")
    gen.add_argument("--json", dest="json_path", default=None, help="write the run's statistics to this file")
    add_option_argument(gen)
    return gen


def cache_options(args) -> dict:
    """The options for ``--method``: its ``--option`` entries, plus ``--sinks/--span/--overlap`` if given.

    The three flags predate ``--option`` and were always accepted: one the method does not take
    (``--span`` for streaming, any of them for ``full``) is skipped with a note, as it was ignored
    before. An ``--option`` key the method does not take is an error naming what it does take,
    rather than a ``TypeError`` from deep inside its builder.
    """
    options = dict(parse_method_options(args.option, [args.method]).get(args.method, {}))
    accepted = _accepted_options(args.method)
    for key in _FLAGS:
        value = getattr(args, key)
        if value is None:
            continue
        if accepted is not None and key not in accepted:
            print(f"[lacache] note: --{key} does not apply to --method {args.method}; ignored", file=sys.stderr)
            continue
        options[key] = value
    unknown = sorted(set(options) - accepted) if accepted is not None else []
    if unknown:
        takes = ", ".join(sorted(accepted)) or "no options"
        raise ValueError(f"--method {args.method} does not take {', '.join(unknown)}; it takes {takes}")
    return options


def _accepted_options(method: str) -> frozenset[str] | None:
    """Option names ``method``'s builder takes (None: any, it has ``**kwargs`` and checks them itself)."""
    return option_names(method)


def _encode_prompt(tokenizer, prompt: str, use_template: bool):
    if use_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
            "input_ids"
        ]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def _mb(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.1f} MiB"


def run_cli(args) -> dict:
    """``lacache generate``: stream the text to stdout, the statistics to stderr (and ``--json``)."""
    import torch

    from .. import models
    from ..cache.generation import IncrementalText, StreamStats, cache_bytes, cache_slots, stream_tokens
    from ..cache.memory import peak_rss_bytes
    from ..registry import make_cache

    values.check_values(args)
    options = cache_options(args)
    if args.json_path:  # a destination that cannot be written is refused now, not after the whole stream
        check_output_file(args.json_path, "--json", example="run.json")
    torch.manual_seed(args.seed)
    model, tokenizer = load_model_for(args)
    cache = make_cache(args.method, model, args.budget, **options)
    input_ids = _encode_prompt(tokenizer, args.prompt, not args.no_chat_template)
    if input_ids.shape[-1] == 0:
        raise ValueError("--prompt is empty (no tokens to start from); give some text, e.g. --prompt 'Once upon a time'")
    stats = StreamStats()
    eos = tokenizer.eos_token_id if args.stop_at_eos else None
    out = sys.stdout
    if not args.quiet:
        print(args.prompt, file=sys.stderr)
        print("---", file=sys.stderr)
    if method_spec(args.method).bounded:
        prompt = int(input_ids.shape[-1])
        note_if_nothing_evicted(args.budget, prompt + args.max_new_tokens,
                                f"this run holds at most (prompt {prompt} + --max-new-tokens {args.max_new_tokens})")
    text_out = IncrementalText(tokenizer, skip_special_tokens=False)
    interrupted = False
    try:
        for token_id in stream_tokens(
            model,
            input_ids,
            cache,
            args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            eos_token_id=eos,
            seed=args.seed,
            stats=stats,
        ):
            if args.quiet:
                continue
            out.write(text_out.feed(token_id))
            out.flush()
    except KeyboardInterrupt:  # Ctrl-C: what was generated stays on screen, then the stats of it
        interrupted = True
        stats.cache_slots, stats.cache_bytes = cache_slots(cache), cache_bytes(cache)
        stats.peak_rss_bytes = peak_rss_bytes()
    if not args.quiet:
        out.write("\n")
    report = {
        "model": models.model_label(args.model),
        "method": args.method,
        "budget": args.budget if method_spec(args.method).bounded else None,
        "cache": cache.describe() if hasattr(cache, "describe") else {"cache": type(cache).__name__},
        "prompt_tokens": stats.prompt_tokens,
        "new_tokens": stats.new_tokens,
        "decode_tokens_per_second": round(stats.decode_tokens_per_second, 2),
        "prefill_seconds": round(stats.prefill_seconds, 3),
        "cache_slots_per_layer": stats.cache_slots,
        "cache_bytes": stats.cache_bytes,
        "peak_rss_bytes": stats.peak_rss_bytes,
        "interrupted": interrupted,
        "samples": [
            {"new_tokens": n, "cache_bytes": c, "rss_bytes": r} for n, c, r in stats.samples
        ],
    }
    if hasattr(cache, "close"):
        cache.close()  # score-based caches remove their attention hooks
    trail = ", ".join(f"{n}: {_mb(c)}" for n, c, _ in stats.samples)
    print(
        f"[lacache] {args.method}: {stats.new_tokens} tokens{' (interrupted)' if interrupted else ''} at "
        f"{stats.decode_tokens_per_second:.1f} tokens/s | "
        f"cache {stats.cache_slots} slots/layer, {_mb(stats.cache_bytes)} | peak RSS {_mb(stats.peak_rss_bytes)}",
        file=sys.stderr,
    )
    if trail:
        print(f"[lacache] cache size by tokens generated: {trail}", file=sys.stderr)
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.json_path, lambda fh: json.dump(report, fh, indent=2))
    if interrupted:
        raise KeyboardInterrupt  # exit status 130, as for any command stopped by Ctrl-C
    return report
