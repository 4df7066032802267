"""``lacache bench``: performance benchmarks (tables, CSV/JSON, PNG plots).

Wire it into the top-level parser with ``add_parser(subparsers)`` and run the parsed arguments with
``run_cli(args)`` (``args.command == "bench"``). Sub-commands: ``decode``, ``memory``, ``stream``,
``cache``, ``prefill`` and ``all`` (a quick version of each); each writes ``<out>/<name>.csv``,
``.json`` and ``.png`` and prints a table. This module only parses arguments, keeps the run's
record (``--resume``) and dispatches: the measurements live in :mod:`lacache.lab.bench`, the
result documents, files and printed tables in :mod:`lacache.lab.bench.report`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..lab.evaluation.checkpoint import RunProgress, check_output_folder
from ..registry import default_method, method_spec, unbounded_method
from . import bench_compile, bench_vllm, values
from .common import (
    add_dtype_argument,
    add_methods_argument,
    add_model_argument,
    add_option_argument,
    load_model_for,
    method_list,
    names,
    parse_method_options,
    positive_int,
    positive_ints,
    progress_for,
    torch_dtype,
)
from .resume import add_resume_argument, open_run

__all__ = ["add_parser", "run_cli", "BENCHMARKS"]

#: the ``lacache bench`` sub-commands
BENCHMARKS = ("decode", "memory", "compile", "stream", "cache", "prefill", "vllm", "all")
DEFAULT_OUT = "runs/bench"
MB = 2**20  # progress lines show megabytes


def _common(parser: argparse.ArgumentParser, model: bool = True) -> None:
    """Flags every benchmark shares (model choice unless ``model=False``, dtype, device, seed, output)."""
    if model:
        add_model_argument(parser)
        parser.add_argument("--tiny", action="store_true", help="a random tiny Llama built in-process instead of --model")
        parser.add_argument("--tiny-layers", type=positive_int, default=4, help="layers of the --tiny model")
        parser.add_argument("--tiny-hidden", type=positive_int, default=64, help="hidden size of the --tiny model")
    add_dtype_argument(parser)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ...; auto: cuda when available")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    add_resume_argument(parser)
    parser.add_argument("--quiet", action="store_true",
                        help="no progress on stderr (by default a bar on a terminal, else one line per finished group)")


def _decode_args(parser: argparse.ArgumentParser) -> None:
    """Flags of ``decode`` and ``memory`` (one run serves both); the method list defaults to the registry's."""
    add_methods_argument(parser, "decode")
    parser.add_argument("--budget", type=positive_int, default=512, help="slots per layer of the bounded caches")
    parser.add_argument("--tokens", type=positive_int, default=8192, help="tokens to generate per method")
    parser.add_argument("--window", type=positive_int, default=256, help="decode steps per ms/token reading")
    parser.add_argument("--prompt-tokens", type=positive_int, default=64,
                        help="prompt length (a prefix of the bundled essays; random ids with --tiny)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    add_option_argument(parser)
    _common(parser)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``bench`` (with its sub-benchmarks) on the top-level sub-parsers; return its parser."""
    from ..lab.bench.method_names import LADDER_STEP, REFERENCE, cache_methods, default_cache_methods

    bench = subparsers.add_parser(
        "bench", help="performance benchmarks: decode speed, memory, constant-memory stream, cache updates, prefill"
    )
    kinds = bench.add_subparsers(dest="benchmark", required=True)
    bench_vllm.add_parser(kinds)

    decode = kinds.add_parser("decode", help="decode ms/token vs generated length per method (also writes memory.*)")
    _decode_args(decode)

    memory = kinds.add_parser("memory", help="cache bytes and process RSS vs generated length (the decode run)")
    _decode_args(memory)
    memory.add_argument("--from", dest="from_json", default=None, metavar="DECODE_JSON",
                        help="plot the memory columns of an earlier decode.json instead of running")

    compiled = kinds.add_parser("compile", help="decode ms/token eager vs torch.compile: full, StaticCache and "
                                                "static bounded caches at the same slots, interleaved")
    compiled.add_argument("--methods", default="lacache,streaming", help="bounded methods (default: %(default)s)")
    compiled.add_argument("--budget", type=positive_int, default=256, help="slots per layer of the bounded caches")
    compiled.add_argument("--window", type=positive_int, default=32, help="decode steps per reading")
    compiled.add_argument("--rounds", type=positive_int, default=6, help="readings per setup, interleaved")
    compiled.add_argument("--backend", default="inductor", help="torch.compile backend (default: %(default)s)")
    compiled.add_argument("--mode", default=None,
                          help="torch.compile mode (default: inductor's; reduce-overhead adds CUDA graphs on a GPU)")
    _common(compiled)

    stream = kinds.add_parser("stream", help="continuous generation at constant memory, sampled at intervals")
    stream.add_argument("--method", default=default_method(), help="a bounded method (default: %(default)s)")
    stream.add_argument("--budget", type=positive_int, default=512)
    stream.add_argument("--tokens", type=positive_int, default=None,
                        help="tokens to generate (default 1,000,000 with --tiny, 20,000 otherwise)")
    stream.add_argument("--interval", type=positive_int, default=None, help="tokens between samples (default tokens/50)")
    stream.add_argument("--prompt-tokens", type=positive_int, default=64)
    stream.add_argument("--temperature", type=float, default=0.0)
    stream.add_argument("--tolerance", type=float, default=0.01, help="allowed relative memory change (0.01 = 1%%)")
    add_option_argument(stream)
    stream.add_argument("--cache-only", action="store_true",
                        help="drive the cache alone with random K/V (no model): a million steps in minutes")
    stream.add_argument("--layers", type=positive_int, default=30, help="with --cache-only")
    stream.add_argument("--kv-heads", type=positive_int, default=3, help="with --cache-only")
    stream.add_argument("--head-dim", type=positive_int, default=64, help="with --cache-only")
    _common(stream)

    cache = kinds.add_parser("cache", help="time per token inside cache.update (synthetic K/V, no model) vs the "
                                           "reference implementation's per-step strategy")
    cache.add_argument("--methods", default=",".join(default_cache_methods()),
                       help=f"comma-separated, from {', '.join(cache_methods())} ({LADDER_STEP}: the capped ladder "
                            f"compacting every step; {REFERENCE}: the authors' per-step mechanics re-implemented; "
                            "default: %(default)s)")
    cache.add_argument("--budgets", default="256,1024,4096")
    cache.add_argument("--layers", default="30,80")
    cache.add_argument("--kv-heads", type=positive_int, default=8)
    cache.add_argument("--head-dim", type=positive_int, default=128)
    cache.add_argument("--positions", default="absolute",
                       help="absolute (as generate() passes them), slots (lacache's own loop), or both: absolute,slots")
    cache.add_argument("--steps", type=positive_int, default=None, help="timed steps (default max(512, 2 x budget))")
    cache.add_argument("--ref-steps", type=positive_int, default=32,
                       help="timed steps for reference and ladder-step (they compact at every step, so each step "
                            "costs the same and few are enough)")
    cache.add_argument("--warmup", type=int, default=32, help="untimed steps after filling the cache")
    _common(cache, model=False)

    prefill = kinds.add_parser("prefill", help="chunked prefill of a long prompt vs the computed full-cache size")
    prefill.add_argument("--method", default=default_method(), help="the cache method (default: %(default)s)")
    prefill.add_argument("--budget", type=positive_int, default=512)
    prefill.add_argument("--tokens", type=positive_int, default=32768, help="prompt length")
    prefill.add_argument("--prefill-chunk", type=positive_int, default=512)
    prefill.add_argument("--random", action="store_true", help="random token ids instead of the bundled essays")
    prefill.add_argument("--compare-full", action="store_true",
                         help="also run a full cache the same way (only when the prompt fits the trained context)")
    add_option_argument(prefill)
    _common(prefill)

    quick = kinds.add_parser("all", help="a quick version of every benchmark (small sizes; minutes on a CPU)")
    add_model_argument(quick)
    quick.add_argument("--tiny", action="store_true", help="use a random tiny Llama for decode/stream/prefill")
    add_dtype_argument(quick)
    quick.add_argument("--device", default="auto")
    quick.add_argument("--out", default=f"{DEFAULT_OUT}/quick")
    add_resume_argument(quick)
    quick.add_argument("--quiet", action="store_true")
    return bench


# --------------------------------------------------------------------------- helpers
def _model_description(args) -> str:
    """How reports name the model ``_load`` gives (known before loading it, so a run's record can hold it)."""
    if getattr(args, "tiny", False):
        return f"random tiny Llama ({args.tiny_layers} layers, hidden {args.tiny_hidden})"
    from ..lab.models import model_label

    return model_label(args.model)


def _load(args):
    """(model, tokenizer or None, description) on the requested device."""
    from .. import bench

    device = values.device(args.device)
    dtype = torch_dtype(args.dtype)
    if getattr(args, "tiny", False):
        model = bench.tiny_model(layers=args.tiny_layers, hidden=args.tiny_hidden, seed=args.seed, dtype=dtype)
        return model.to(device), None, _model_description(args)
    model, tokenizer = load_model_for(args, device=device)
    return model, tokenizer, _model_description(args)


def _run_settings(args, *names: str) -> dict:
    """What gives a benchmark's rows their meaning, for its record: the model, dtype, device and ``names``."""
    settings = {"dtype": args.dtype, "device": str(values.device(args.device)), "seed": args.seed}
    if hasattr(args, "tiny"):
        settings["model"] = _model_description(args)
    return {**settings, **{name: getattr(args, name) for name in names}}


def _logger(args):
    """Where a benchmark's notes go: stderr, unless ``--quiet``."""
    def log(text: str) -> None:
        if not getattr(args, "quiet", False):
            print(text, file=sys.stderr, flush=True)

    return log


def _device_of(model):
    return next(model.parameters()).device


# --------------------------------------------------------------------------- sub-commands
def run_decode(args: argparse.Namespace, write_memory: bool = True) -> dict:
    """``bench decode``: one decode run per method; also writes ``memory.*`` since the same run measured it."""
    from .. import bench
    from ..lab.bench.prompts import prompt_ids
    from ..lab.bench.report import decode_result, report_decode

    methods = method_list(args.methods)
    options = parse_method_options(args.option, methods)
    progress = open_run(args, "decode", "bench decode",
                        _run_settings(args, "budget", "tokens", "window", "prompt_tokens", "temperature"),
                        per_method={m: options.get(m, {}) for m in methods}, noun="methods")
    model, tokenizer, desc = _load(args)
    prompt = prompt_ids(model, tokenizer, args.prompt_tokens, args.seed)
    geometry = bench.model_geometry(model)
    log = _logger(args)
    log(f"[bench decode] {desc}: {', '.join(methods)}, budget {args.budget}, {args.tokens} tokens, "
        f"prompt {prompt.shape[1]} tokens")

    finished = {key[0]: value for key, value in progress.finished.items()}
    meter = progress_for(args, "bench decode", unit="tok", units="tok")

    def log_row(row):
        meter.advance(row["last"] - row["first"] + 1)
        meter.note(f"[bench decode] {row['method']:>9} tokens {row['last']:>6}: {row['ms_per_token']:7.2f} ms/token, "
                   f"cache {row['cache_bytes'] / MB:8.1f} MB, RSS {row['rss_bytes'] / MB:7.1f} MB")

    def method_done(method: str, mine: list[dict]) -> None:
        progress.add((method,), mine)
        meter.group_done(method, note=f"{bench.decode_summary(mine)[0]['ms_per_token_mean']:.2f} ms/token")

    with progress.keep_on_interrupt():
        with meter.start(sum(m not in finished for m in methods) * (args.tokens - 1)):
            rows = bench.bench_decode(model, prompt, methods, budget=args.budget, tokens=args.tokens,
                                      window=args.window, temperature=args.temperature, seed=args.seed,
                                      method_options=options, on_row=log_row, finished=finished,
                                      on_method=method_done)
        payload = decode_result(rows, model=desc, dtype=args.dtype, geometry=geometry, budget=args.budget,
                                tokens=args.tokens, window=args.window, prompt_tokens=int(prompt.shape[1]),
                                temperature=args.temperature, method_options=options, device=_device_of(model))
        report_decode(payload, Path(args.out), memory=write_memory, log=log)
    progress.finish()
    return payload


def _read_decode_json(path: str) -> dict:
    """``--from``: a decode.json written by ``bench decode``, or a ``ValueError`` saying what it is instead."""
    from ..lab.results import bench_kind, declared_kind

    hint = "give the decode.json that `lacache bench decode --out DIR` wrote, e.g. --from runs/bench/decode.json"
    try:
        with open(path, encoding="utf-8") as fh:
            payload = json.load(fh)
    except FileNotFoundError:
        raise ValueError(f"--from {path} does not exist; {hint}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"--from {path} could not be read as JSON ({err}); {hint}") from None
    if not isinstance(payload, dict):
        raise ValueError(f"--from {path} is not a decode.json written by `lacache bench decode`; {hint}")
    kind, _ = declared_kind(payload)
    decode = kind == bench_kind("decode") if kind is not None else payload.get("benchmark") == "decode"  # or older
    if not decode or not all(isinstance(payload.get(key), list) for key in ("rows", "summary")):
        raise ValueError(f"--from {path} is not a decode.json written by `lacache bench decode`; {hint}")
    return payload


def run_memory(args: argparse.Namespace) -> dict:
    """``bench memory``: the decode run's memory columns, re-plotted from ``--from`` without re-running if given."""
    from ..lab.bench.report import report_memory

    if args.from_json is None:
        return run_decode(args, write_memory=True)
    check_output_folder(args.out, "--out", example=DEFAULT_OUT)
    payload = _read_decode_json(args.from_json)
    report_memory(payload, Path(args.out), args.from_json, log=_logger(args))
    return payload


def run_stream(args: argparse.Namespace) -> dict:
    """``bench stream``: a long stream (or ``--cache-only`` updates) and the flat-memory verdict."""
    from ..lab.bench.report import report_stream

    options = parse_method_options(args.option, method_list(args.method, "method")).get(args.method)
    if not method_spec(args.method).bounded:
        raise ValueError(f"--method {args.method} has no bound; the stream benchmark needs a bounded cache, e.g. "
                         f"{default_method()}")
    tokens = args.tokens or (1_000_000 if args.tiny or args.cache_only else 20_000)
    shape = ("layers", "kv_heads", "head_dim") if args.cache_only else ("prompt_tokens", "temperature")
    settings = {**_run_settings(args, "method", "budget", "interval", "tolerance", "cache_only", *shape),
                "tokens": tokens, "options": options}
    # one stream is one configuration: a stream cut short is run again; a finished one is reused as a whole
    progress = open_run(args, "stream", "bench stream", settings, noun="streams")
    with progress.keep_on_interrupt():
        payload = progress.finished.get(("stream",))
        if payload is None:
            payload = _run_stream(args, tokens, options)
            progress.add(("stream",), payload)
        report_stream(payload, Path(args.out), log=_logger(args))
    progress.finish()
    return payload


def _run_stream(args: argparse.Namespace, tokens: int, options: dict | None) -> dict:
    """The stream itself (or ``--cache-only`` updates): the document ``stream.json`` holds."""
    from .. import bench
    from ..lab.bench.prompts import prompt_ids
    from ..lab.bench.report import stream_result

    if args.cache_only:
        desc = f"cache only, {args.layers} layers x {args.kv_heads} KV heads x {args.head_dim} (float32, random K/V)"
    else:
        model, tokenizer, desc = _load(args)
        prompt = prompt_ids(model, tokenizer, args.prompt_tokens, args.seed)
    _logger(args)(f"[bench stream] {desc}: {args.method}, budget {args.budget}, {tokens:,} tokens")
    meter = progress_for(args, "bench stream", unit="tok", units="tok").start(tokens)

    def progress(s):
        meter.advance(s["tokens"] - meter.done)
        cuda = "" if s["cuda_allocated_bytes"] is None else f", CUDA {s['cuda_allocated_bytes'] / MB:.1f} MB"
        meter.note(f"[bench stream] {s['tokens']:>10,} tokens: {s['tokens_per_s']:8.1f} tok/s, cache "
                   f"{s['cache_bytes'] / MB:.2f} MB, RSS {s['rss_bytes'] / MB:.1f} MB{cuda}, {s['num_slots']} slots")

    with meter:
        if args.cache_only:
            result = bench.bench_cache_stream(tokens, args.budget, args.layers, args.kv_heads, args.head_dim,
                                              method=args.method, interval=args.interval, tolerance=args.tolerance,
                                              seed=args.seed, on_sample=progress)
            device, geometry = "cpu", result["shape"]
        else:
            result = bench.bench_stream(model, prompt, tokens, budget=args.budget, interval=args.interval,
                                        method=args.method, method_options=options, temperature=args.temperature,
                                        seed=args.seed, tolerance=args.tolerance, on_sample=progress)
            device, geometry = _device_of(model), bench.model_geometry(model)
        meter.group_done(f"{args.method} budget={args.budget}")
    return stream_result(result, model=desc, dtype=args.dtype, geometry=geometry, device=device)


def run_cache(args: argparse.Namespace) -> dict:
    """``bench cache``: time inside ``cache.update`` per token against the reference strategy (no model)."""
    from .. import bench
    from ..lab.bench.report import cache_result, report_cache

    methods = names(args.methods, bench.cache_methods(), "methods")
    positions = names(args.positions, ("absolute", "slots"), "positions")
    budgets, layers = positive_ints(args.budgets, "budgets"), positive_ints(args.layers, "layers")
    device = values.device(args.device)
    dtype = torch_dtype(args.dtype)
    progress = open_run(args, "cache", "bench cache",
                        _run_settings(args, "kv_heads", "head_dim", "steps", "ref_steps", "warmup"),
                        noun="configurations")
    log = _logger(args)
    log(f"[bench cache] budgets {budgets}, layers {layers}, {args.kv_heads} KV heads x {args.head_dim}, "
        f"{args.dtype} on {device}; methods {', '.join(methods)}")
    configurations = bench.cache_configurations(layers, budgets, methods, positions)
    meter = progress_for(args, "bench cache", unit="configuration")
    meter.start(sum(key not in progress.finished for key in configurations))

    def record(r):
        progress.add((r["layers"], r["budget"], r["method"], r["positions"]), r)
        meter.advance()
        meter.group_done(f"{r['layers']} layers, budget {r['budget']}, {r['method']} ({r['positions']})",
                         note=f"{r['ms_per_token']:.3f} ms/token over {r['steps']} steps")

    with progress.keep_on_interrupt():
        with meter:
            rows = bench.bench_cache_update(budgets, layers, kv_heads=args.kv_heads, head_dim=args.head_dim,
                                            methods=methods, positions=positions, steps=args.steps,
                                            ref_steps=args.ref_steps, warmup=args.warmup, dtype=dtype,
                                            device=device, seed=args.seed, on_row=record, finished=progress.finished)
        payload = cache_result(rows, bench.cache_summary(rows), kv_heads=args.kv_heads, head_dim=args.head_dim,
                               dtype=args.dtype, device=device)
        report_cache(payload, Path(args.out), log=log)
    progress.finish()
    return payload


def run_prefill(args: argparse.Namespace) -> dict:
    """``bench prefill``: chunked prefill of a long prompt against the computed full-cache size."""
    from .. import bench
    from ..lab.bench.prompts import prompt_ids
    from ..lab.bench.report import prefill_result, report_prefill

    options = parse_method_options(args.option, method_list(args.method, "method"))
    settings = {**_run_settings(args, "method", "budget", "tokens", "prefill_chunk", "random"),
                "options": options.get(args.method)}
    record = open_run(args, "prefill", "bench prefill", settings, noun="prefill runs")
    model, tokenizer, desc = _load(args)
    ids = prompt_ids(model, tokenizer, args.tokens, args.seed, random_ids=args.random)
    text = "random ids" if args.random or tokenizer is None else "bundled essays"
    log = _logger(args)
    log(f"[bench prefill] {desc}: {args.method}, budget {args.budget}, {ids.shape[1]:,} tokens of {text} "
        f"in chunks of {args.prefill_chunk}")

    meter = progress_for(args, "bench prefill", unit="tok", units="tok")

    def progress(r):
        meter.advance(r["tokens"] - meter.done)
        meter.note(f"[bench prefill] {r['tokens']:>7,} tokens: {r['chunk_tokens_per_s']:8.1f} tok/s (chunk), "
                   f"RSS {r['rss_bytes'] / MB:7.1f} MB, cache {r['cache_bytes'] / MB:7.1f} MB")

    def prefill(key: tuple, method: str, method_options: dict | None) -> dict:
        """One prefill run, or its result recorded by an interrupted run."""
        if key not in record.finished:
            with meter.start(int(ids.shape[1])):
                record.add(key, bench.bench_prefill(model, ids, budget=args.budget, prefill_chunk=args.prefill_chunk,
                                                    method=method, method_options=method_options, on_row=progress))
                meter.group_done(f"{method} budget={args.budget}" if method_spec(method).bounded else method)
        return record.finished[key]

    with record.keep_on_interrupt():
        result = prefill(("prefill", args.method), args.method, options.get(args.method))
        s = result["summary"]
        full = None
        if args.compare_full:
            if s["beyond_trained_context"]:
                log(f"[bench prefill] --compare-full skipped: {s['tokens']} tokens exceed the trained "
                    f"context ({s['trained_context']}); the full cache size is computed instead")
            else:
                full = prefill(("compare-full",), unbounded_method(), None)
        payload = prefill_result(result, model=desc, dtype=args.dtype, text=text, device=_device_of(model), full=full)
        report_prefill(payload, Path(args.out), log=log)
    record.finish()
    return payload


def run_all(args: argparse.Namespace) -> dict:
    """Quick versions of every benchmark, each into ``<out>`` (with ``--resume``, each resumes its own record)."""
    check_output_folder(args.out, "--out", example=f"{DEFAULT_OUT}/quick")
    parser = argparse.ArgumentParser(prog="lacache")
    add_parser(parser.add_subparsers(dest="command"))
    common = ["--dtype", args.dtype, "--device", args.device, "--out", args.out]
    if args.quiet:
        common.append("--quiet")
    if getattr(args, "resume", False):
        common.append("--resume")
    else:  # refuse now, not after the benchmarks before an unfinished one have run again
        for name in ("decode", "stream", "prefill", "cache"):
            RunProgress.refuse_unfinished(args.out, name, noun="configurations")
    model = (["--tiny"] if args.tiny else []) + (["--model", args.model] if args.model and not args.tiny else [])
    plans = [
        ["decode", "--tokens", "256", "--budget", "128", "--window", "64", *model],
        ["stream", "--tokens", "5000" if args.tiny else "1000", "--budget", "128", *model],
        ["prefill", "--tokens", "2048", "--budget", "256", "--prefill-chunk", "256", *model],
        # last: its large synthetic caches would raise the RSS readings of the others
        ["cache", "--budgets", "256,1024", "--layers", "30", "--steps", "256", "--ref-steps", "8", "--warmup", "8"],
    ]
    results = {}
    for plan in plans:
        sub = parser.parse_args(["bench", *plan, *common])
        results[plan[0]] = run_cli(sub)
    return results


def run_cli(args: argparse.Namespace) -> dict:
    """Run the benchmark named by ``args.benchmark``; raises ``ValueError`` for bad options."""
    from ..lab.evaluation.distributed import shard_from_environment

    runners = {"decode": lambda a: run_decode(a, write_memory=True), "memory": run_memory, "stream": run_stream,
               "compile": lambda a: bench_compile.run_compile(a, _load, _logger(a)),
               "cache": run_cache, "prefill": run_prefill, "all": run_all, "vllm": bench_vllm.run_cli}
    world = shard_from_environment().world
    if world > 1:  # timings taken side by side would measure the neighbours too
        raise ValueError(f"lacache bench {args.benchmark} measures one process and is not split across processes "
                         f"(WORLD_SIZE={world}); run it without torchrun / accelerate launch (only lacache eval is "
                         f"split)")
    values.check_values(args)
    return runners[args.benchmark](args)
