"""What each benchmark leaves behind: its result document, its files, its printed table.

The measurements (:mod:`.decode`, :mod:`.stream`, :mod:`.cache_update`, :mod:`.prefill`) return
rows; this module turns them into ``<out>/<name>.json`` (the result document: its ``kind`` and
``schema`` from :mod:`lacache.lab.results`, the run record and ``environment`` from
:mod:`lacache.lab.runinfo`), ``<name>.csv`` and ``<name>.png``, and prints the table a reader of
the terminal sees. ``lacache bench`` (:mod:`lacache.cli.bench`) only parses its arguments, runs
the measurement and hands the rows here, so a notebook gets the same files as the command line.

Every ``*_result`` function builds a document; every ``report_*`` function writes one and prints
its table (``log`` gets the lines meant for stderr: what was written, notes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ...registry import default_method, method_spec
from ..evaluation.report import format_table, write_csv
from ..results import bench_kind, write_result
from ..runinfo import environment
from .cache_update import REFERENCE
from .decode import decode_summary
from .plots import plot_cache, plot_decode, plot_memory, plot_prefill, plot_stream

__all__ = [
    "DECODE_COLUMNS",
    "MEMORY_KEYS",
    "cache_result",
    "decode_result",
    "prefill_result",
    "report_cache",
    "report_decode",
    "report_memory",
    "report_prefill",
    "report_stream",
    "stream_result",
    "text_table",
    "write_files",
    "write_memory",
]

MB = 2**20
Log = Callable[[str], None]
#: a column of a printed table: (header, key of the row, transform of a present value or None)
Column = tuple[str, str, Callable[[Any], Any] | None]

DECODE_COLUMNS: list[Column] = [
    ("method", "method", None), ("budget", "budget", None), ("tokens", "tokens", None),
    ("ms/tok first", "ms_per_token_first", None), ("ms/tok last", "ms_per_token_last", None),
    ("ms/tok mean", "ms_per_token_mean", None), ("tok/s", "tokens_per_s", None),
    ("cache MB", "cache_mb_last", None), ("RSS MB", "rss_mb_last", None), ("peak RSS MB", "peak_rss_mb", None),
]
#: the columns of memory.csv (and of memory.json's rows): the decode run's memory readings
MEMORY_KEYS = ["method", "budget", "last", "context", "cache_slots", "cache_bytes", "rss_bytes", "peak_rss_bytes",
               "cuda_allocated_bytes"]


def _silent(text: str) -> None:
    """The default ``log``: say nothing."""


def _mb(x) -> float | None:
    return None if x is None else x / MB


def _written(log: Log, out: Path, *names: str) -> None:
    log(f"[bench] wrote {', '.join(str(out / f'{n}.{e}') for n in names for e in ('csv', 'json', 'png'))}")


def write_files(out: Path, name: str, rows: Sequence[Mapping], payload: Mapping[str, Any]) -> dict[str, Any]:
    """``<out>/<name>.csv`` (``rows``, every key a column) and ``<name>.json`` (``payload`` as a result of
    kind ``bench.<name>``, with the run record); returns the document written."""
    out.mkdir(parents=True, exist_ok=True)
    headers = list(dict.fromkeys(k for r in rows for k in r))
    write_csv(out / f"{name}.csv", headers, [[r.get(h) for h in headers] for r in rows])
    return write_result(out / f"{name}.json", bench_kind(name), payload)


def text_table(rows: Sequence[Mapping], columns: Sequence[Column]) -> str:
    """``rows`` as a text table; ``columns`` are (header, key, transform or None)."""
    body = []
    for r in rows:
        line = []
        for _, key, fn in columns:
            value = r.get(key)
            line.append(fn(value) if fn is not None and value is not None else value)
        body.append(line)
    return format_table([c[0] for c in columns], body)


# --------------------------------------------------------------------------- decode and memory
def decode_result(rows: list[dict], *, model: str, dtype: str, geometry: Mapping, budget: int, tokens: int,
                  window: int, prompt_tokens: int, temperature: float, method_options: Mapping, device) -> dict:
    """The ``decode.json`` document of a decode run (its ``rows`` and their per-method ``summary``)."""
    return {
        "benchmark": "decode", "model": model, "dtype": dtype, **geometry, "budget": budget,
        "tokens": tokens, "window": window, "prompt_tokens": prompt_tokens,
        "temperature": temperature, "method_options": dict(method_options), "environment": environment(device),
        "summary": decode_summary(rows), "rows": rows,
    }


def write_memory(payload: Mapping[str, Any], out: Path) -> None:
    """``memory.csv``/``.json``/``.png``: the memory columns of a decode run's ``payload``."""
    rows = [{k: r.get(k) for k in MEMORY_KEYS} for r in payload["rows"]]
    write_files(out, "memory", rows, {**payload, "rows": rows})
    plot_memory(rows, out / "memory.png",
                title=f"Memory while decoding (budget {payload['budget']}, {payload['model']})")


def report_decode(payload: Mapping[str, Any], out: Path, *, memory: bool = True, log: Log = _silent) -> None:
    """Write decode.* (and memory.*, which the same run measured) into ``out``; print the table."""
    rows, summary = payload["rows"], payload["summary"]
    write_files(out, "decode", rows, payload)
    plot_decode(rows, out / "decode.png", title=f"Decode ms/token (budget {payload['budget']}, {payload['model']})")
    if memory:
        write_memory(payload, out)
    device = payload["environment"]["device"]
    print(f"Decode, {payload['tokens']} tokens after a {payload['prompt_tokens']}-token prompt, budget "
          f"{payload['budget']} ({payload['model']}, {payload['dtype']}, {device})")
    print(text_table(summary, DECODE_COLUMNS))
    context = payload.get("trained_context")
    unbounded = [s["method"] for s in summary if not method_spec(s["method"]).bounded]
    if context and unbounded and payload["prompt_tokens"] + payload["tokens"] > context:
        log(f"[bench decode] note: the {', '.join(unbounded)} cache went past the trained context ({context})")
    _written(log, out, "decode", *(["memory"] if memory else []))


def report_memory(payload: Mapping[str, Any], out: Path, source: str, log: Log = _silent) -> None:
    """``bench memory --from``: memory.* from an earlier decode run's ``payload`` (read from ``source``)."""
    write_memory(payload, out)
    print(f"Memory while decoding (from {source})")
    print(text_table(payload["summary"], [c for c in DECODE_COLUMNS if c[1] in (
        "method", "budget", "tokens", "cache_mb_last", "rss_mb_last", "peak_rss_mb")]))
    _written(log, out, "memory")


# --------------------------------------------------------------------------- stream
def stream_result(result: Mapping[str, Any], *, model: str, dtype: str, geometry: Mapping, device) -> dict:
    """The ``stream.json`` document of a stream (``result`` of ``bench_stream`` / ``bench_cache_stream``)."""
    return {"benchmark": "stream", "model": model, "dtype": dtype, **geometry, "environment": environment(device),
            **result}


def _verdict_lines(result: Mapping[str, Any]) -> list[str]:
    """The flat-memory verdict of a stream, as printed under its table."""
    v, ref = result["verdict"], result["reference"]
    if ref is None:
        return ["verdict: the cache never filled (tokens <= budget): nothing to compare"]
    names = (("cache bytes", "cache_bytes"), ("RSS", "rss_bytes"), ("CUDA allocated", "cuda_allocated_bytes"))
    parts = [f"{name} x{v[key + '_ratio']:.4f}" for name, key in names if key + "_ratio" in v]
    filled = [f"{name} x{v[key + '_ratio_vs_filled']:.4f}" for name, key in names if key + "_ratio_vs_filled" in v]
    return [f"verdict: memory after {v['final_tokens']:,} tokens vs once the first compaction was applied "
            f"({ref['tokens']:,} tokens): {', '.join(parts)} -> {'FLAT' if v['flat'] else 'NOT FLAT'} "
            f"(tolerance {100 * v['tolerance']:g}%); cache {result['final']['cache_bytes']:,} B, expected "
            f"kv_bytes(budget + headroom) = {result['expected_cache_bytes']:,} B",
            f"         vs the first overflow, before any compaction ({v['filled_tokens']:,} tokens): "
            f"{', '.join(filled)}"]


def report_stream(payload: Mapping[str, Any], out: Path, log: Log = _silent) -> None:
    """Write stream.csv/json/png into ``out``; print a dozen samples and the flat-memory verdict."""
    samples = payload["samples"]
    write_files(out, "stream", samples, payload)
    plot_stream(payload, out / "stream.png")
    columns = [("tokens", "tokens", None), ("tok/s", "tokens_per_s", None), ("cache MB", "cache_bytes", _mb),
               ("RSS MB", "rss_bytes", _mb), ("CUDA MB", "cuda_allocated_bytes", _mb), ("slots", "num_slots", None)]
    shown = samples
    if len(shown) > 12:  # the table shows a dozen samples; the CSV has them all
        step = math.ceil(len(shown) / 12)
        shown = shown[::step] + ([shown[-1]] if (len(shown) - 1) % step else [])
    print(f"Constant-memory stream: {payload['method']}, budget {payload['budget']}, {payload['tokens']:,} tokens "
          f"({payload['model']}, {payload['dtype']}, {payload['environment']['device']}); "
          f"{payload['tokens_per_s']:.1f} tokens/s overall")
    print(text_table(shown, columns))
    for line in _verdict_lines(payload):
        print(line)
    _written(log, out, "stream")


# --------------------------------------------------------------------------- cache update
def cache_result(rows: list[dict], summary: list[dict], *, kv_heads: int, head_dim: int, dtype: str,
                 device) -> dict:
    """The ``cache.json`` document of a cache-update run."""
    return {"benchmark": "cache", "kv_heads": kv_heads, "head_dim": head_dim, "dtype": dtype,
            "environment": environment(device), "summary": summary, "rows": rows}


def report_cache(payload: Mapping[str, Any], out: Path, log: Log = _silent) -> None:
    """Write cache.csv/json/png into ``out``; print ms/token per method, and reference / default method."""
    rows, device = payload["rows"], payload["environment"]["device"]
    shape = f"{payload['kv_heads']} KV heads x {payload['head_dim']}, {payload['dtype']}, {device}"
    write_files(out, "cache", rows, payload)
    plot_cache(rows, out / "cache.png", title=f"cache.update per token, all layers ({shape})")
    methods = list(dict.fromkeys(r["method"] for r in rows))
    columns: list[Column] = [("layers", "layers", None), ("budget", "budget", None), ("positions", "positions", None)]
    columns += [(f"{m} ms", f"{m}_ms", None) for m in methods]
    ours = default_method()
    if REFERENCE in methods and ours in methods:
        columns.append((f"ref/{ours}", f"{REFERENCE}_over_{ours}", None))
    print(f"Time per token inside cache.update, all layers ({shape}, batch 1, one token per step)")
    print(text_table(payload["summary"], columns))
    _written(log, out, "cache")


# --------------------------------------------------------------------------- prefill
def prefill_result(result: Mapping[str, Any], *, model: str, dtype: str, text: str, device,
                   full: Mapping[str, Any] | None = None) -> dict:
    """The ``prefill.json`` document of a prefill run (and of its ``--compare-full`` run, ``full``)."""
    return {"benchmark": "prefill", "model": model, "dtype": dtype, "text": text,
            "environment": environment(device), **result, "full": full}


def report_prefill(payload: Mapping[str, Any], out: Path, log: Log = _silent) -> None:
    """Write prefill.csv/json/png into ``out``; print the run (and its ``--compare-full`` run)."""
    s, full = payload["summary"], payload.get("full")
    write_files(out, "prefill", payload["rows"], payload)
    plot_prefill(payload, out / "prefill.png", full=full)
    summaries = [{**x, "full_kv_mb": x["full_cache_bytes"] / MB} for x in [s] + ([full["summary"]] if full else [])]
    print(f"Chunked prefill of {s['tokens']:,} tokens ({payload['text']}), chunk {s['prefill_chunk']} "
          f"({payload['model']}, {payload['dtype']}, {payload['environment']['device']}); trained context "
          f"{s['trained_context']}")
    print(text_table(summaries, [
        ("method", "method", None), ("budget", "budget", None), ("tokens", "tokens", None),
        ("seconds", "seconds", None), ("tok/s", "tokens_per_s", None), ("peak RSS MB", "peak_rss_bytes", _mb),
        ("CUDA peak MB", "cuda_max_allocated_bytes", _mb), ("cache MB", "cache_bytes", _mb),
        ("full KV MB (computed)", "full_kv_mb", None),
    ]))
    _written(log, out, "prefill")
