"""Misuse of the ``lacache`` command line: every outcome is success or exit status 2 with one
``lacache: error:`` line (or argparse's own usage error), never a traceback, and bad values are
refused before any model loads.

The first half pins each reviewed case to its message; the second half fuzzes every sub-command's
arguments with hypothesis. Runs that pass validation are kept cheap: the model loader (and the
benchmarks' synthetic work) raise :class:`Loaded`, which counts as success, except for ``generate``
and ``chat``, which run for real on a tiny random model with the bundled tokenizer and 3 new tokens.
"""

from __future__ import annotations

import io
import itertools
import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import bundled_tokenizer_and_tiny_model
from lacache import registry
from lacache.cli.main import main

FIXTURE = Path(__file__).parent / "fixtures" / "longbench"


class Loaded(Exception):
    """Raised where a model (or a benchmark's synthetic workload) would be loaded: validation passed."""


def _refuse_loading(*args, **kwargs):
    raise Loaded()


@pytest.fixture(autouse=True)
def restore_registry():
    """``--variant`` registers methods process-wide; leave the registry as each test found it."""
    methods, names = dict(registry._BY_NAME), registry.METHODS
    yield
    registry._BY_NAME.clear()
    registry._BY_NAME.update(methods)
    registry.METHODS = names


@pytest.fixture
def no_model(monkeypatch):
    """Every path to a model or an expensive benchmark stops with :class:`Loaded`."""
    import lacache.lab.bench
    import lacache.lab.models

    monkeypatch.setattr(lacache.lab.models, "load_model", _refuse_loading)
    for name in ("tiny_model", "bench_cache_update", "bench_cache_stream"):
        monkeypatch.setattr(lacache.lab.bench, name, _refuse_loading)


@pytest.fixture(scope="module")
def tiny_pair():
    tokenizer, model = bundled_tokenizer_and_tiny_model(layers=2)
    return model, tokenizer


def _error(capsys, argv: list[str]) -> str:
    """Run ``argv``; it must exit 2 with exactly one ``lacache: error:`` line, which is returned."""
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lacache: error:")]
    assert len(lines) == 1, lines
    return lines[0]


# --------------------------------------------------------------------------------------------------
# Each reviewed case, by its message
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, expected", [
    (["generate", "--model", "/nonexistent/model"], r"--model /nonexistent/model: no such file or folder.*leave --model out"),
    (["generate", "--model", "missing.gguf"], r"--model missing.gguf: no such GGUF file"),
    (["generate", "--top-p", "-1"], r"--top-p -1.0 must be a finite number in \(0, 1\], e.g. --top-p 0.9"),
    (["generate", "--top-p", "nan"], r"--top-p nan must be .* e.g. --top-p 0.9"),
    (["generate", "--temperature", "nan"], r"--temperature nan must be a finite number >= 0 \(0 = greedy\), e.g. "
                                           r"--temperature 0.7"),
    (["generate", "--temperature", "inf"], r"--temperature inf must be a finite number"),
    (["generate", "--temperature", "-0.5"], r"--temperature -0.5 must be a finite number >= 0"),
    (["generate", "--seed", str(2**70)], r"--seed \d+ must be an integer from .* e.g. --seed 0"),
    (["generate", "--sinks", "-1"], r"--sinks -1 must be an integer >= 0, e.g. --sinks 4"),
    (["generate", "--span", "0"], r"--span 0 must be an integer >= 1, e.g. --span 3"),
    (["generate", "--option", "lacache.bogus=1"], r"--option lacache.bogus=1: lacache does not take 'bogus'; it takes "
                                                  r"chunk, .*span"),
    (["generate", "--method", "streaming", "--option", "lacache.span=3"],
     r"--option lacache.span=3: 'lacache' is not being run here \(methods: streaming\)"),
    (["generate", "--method", "full", "--option", "full.sinks=2"], r"full does not take 'sinks'; it takes no options"),
    (["chat", "--top-p", "1.5"], r"--top-p 1.5 must be a finite number in \(0, 1\]"),
    (["chat", "--temperature", "nan"], r"--temperature nan must be"),
    (["chat", "--model", "./no/such/folder"], r"--model ./no/such/folder: no such file or folder"),
    (["eval", "ppl", "--budgets", ""], r"--budgets '' must list positive integers, e.g. --budgets 256,1024"),
    (["eval", "ppl", "--budgets", "128,-4"], r"--budgets '128,-4' must list positive integers"),
    (["eval", "ppl", "--budgets", "1.5"], r"--budgets '1.5' must be a comma-separated list of integers"),
    (["eval", "ppl", "--methods", ""], r"--methods \(empty\) not known; choose from full,"),
    (["eval", "ppl", "--text-file", "/nonexistent.txt"], r"--text-file /nonexistent.txt does not exist; give a UTF-8 "
                                                         r"text file"),
    (["eval", "ppl", "--option", "lacache.bogus=1"], r"lacache does not take 'bogus'"),
    (["eval", "ppl", "--methods", "full,lacache", "--option", "h2o.window=8"],
     r"--option h2o.window=8: 'h2o' is not being run here \(methods: full, lacache\)"),
    (["eval", "ppl", "--variant", "g8=lacache,bogus=8"], r"--variant g8=lacache,bogus=8: lacache does not take 'bogus'"),
    (["eval", "passkey", "--budget", "inf"], r"--budget inf must be a finite number > 0.*e.g. --budget 0.5"),
    (["eval", "passkey", "--budget", "nan"], r"--budget nan must be a finite number > 0"),
    (["eval", "passkey", "--budget", "-2"], r"--budget -2.0 must be a finite number > 0"),
    (["eval", "passkey", "--budget", "0"], r"--budget 0.0 must be a finite number > 0"),
    (["eval", "passkey", "--depths", "0,nan"], r"--depths '0,nan' must list numbers from 0 to 1"),
    (["eval", "passkey", "--lengths", ","], r"--lengths ',' must list positive integers"),
    (["eval", "ruler", "--budget", "inf"], r"--budget inf must be a finite number > 0"),
    (["eval", "ruler", "--budget", "-0.5"], r"--budget -0.5 must be a finite number > 0"),
    (["eval", "longbench", "--data", str(FIXTURE), "--budget", "nan"], r"--budget nan must be a finite number > 0"),
    (["eval", "longbench", "--data", str(FIXTURE), "--max-length", "1"], r"--max-length 1 must be an integer >= 2"),
    (["eval", "longbench", "--data", "/nonexistent"], r"LongBench data folder '/nonexistent' does not exist"),
    (["bench", "decode", "--device", "bogus"], r"--device 'bogus' is not a device; use auto, cpu, cuda or cuda:N"),
    (["bench", "decode", "--device", "meta"], r"--device meta: lacache runs on cpu or cuda"),
    (["bench", "decode", "--temperature", "nan"], r"--temperature nan must be"),
    (["bench", "all", "--device", "bogus"], r"--device 'bogus' is not a device"),
    (["bench", "cache", "--device", "bogus"], r"--device 'bogus' is not a device"),
    (["bench", "cache", "--head-dim", "7"], r"--head-dim 7 must be a multiple of 2"),
    (["bench", "cache", "--warmup", "-1"], r"--warmup -1 must be an integer >= 0"),
    (["bench", "stream", "--tolerance", "nan"], r"--tolerance nan must be a finite number >= 0"),
    (["bench", "stream", "--method", "bogus"], r"--method bogus not known; choose from"),
    (["bench", "stream", "--tiny", "--tiny-hidden", "12"], r"--tiny-hidden 12 must be a multiple of 8"),
    (["bench", "prefill", "--method", "lacache", "--option", "lacache.bogus=1"], r"lacache does not take 'bogus'"),
    (["bench", "memory", "--from", "/nonexistent/decode.json"],
     r"--from /nonexistent/decode.json does not exist; give the decode.json that `lacache bench decode"),
])
def test_each_bad_value_is_one_line_before_any_model_loads(no_model, capsys, tmp_path, argv, expected):
    import re

    if argv[0] in ("eval", "bench"):
        argv = [*argv, "--out", str(tmp_path / "out")]
    assert re.search(expected, _error(capsys, argv))


@pytest.mark.parametrize("content, expected", [
    ("[1, 2]", r"--from .*bad.json is not a decode.json written by `lacache bench decode`"),
    ('{"benchmark": "decode"}', r"is not a decode.json"),
    ("not json", r"--from .*bad.json could not be read as JSON"),
])
def test_bench_memory_from_a_file_that_is_not_a_decode_json(no_model, capsys, tmp_path, content, expected):
    import re

    (tmp_path / "bad.json").write_text(content, encoding="utf-8")
    message = _error(capsys, ["bench", "memory", "--from", str(tmp_path / "bad.json"), "--out", str(tmp_path / "o")])
    assert re.search(expected, message)


def test_text_file_that_is_not_utf8(no_model, capsys, tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 ".encode("latin-1") * 50)
    message = _error(capsys, ["eval", "ppl", "--text-file", str(tmp_path / "latin1.txt"), "--out", str(tmp_path / "o")])
    assert "--text-file" in message and "not UTF-8 text" in message


def test_a_hub_id_that_does_not_load_is_one_line(monkeypatch, capsys):
    """What the loaders raise for a model they cannot find (an OSError, many lines) becomes one line."""
    import lacache.lab.models

    def not_found(*args, **kwargs):
        raise OSError("someone/missing is not a local folder\nand is not a valid model identifier")

    monkeypatch.setattr(lacache.lab.models, "load_model", not_found)
    message = _error(capsys, ["generate", "--model", "someone/missing"])
    assert "--model someone/missing could not be loaded: someone/missing is not a local folder and is not" in message


def test_undecodable_command_line_bytes(no_model, capsys):
    message = _error(capsys, ["generate", "--prompt", b"caf\xe9".decode("utf-8", "surrogateescape")])
    assert "--prompt: the value is not valid UTF-8 text" in message


def test_generate_with_an_empty_raw_prompt(monkeypatch, capsys, tiny_pair):
    import lacache.lab.models

    monkeypatch.setattr(lacache.lab.models, "load_model", lambda *a, **k: tiny_pair)
    message = _error(capsys, ["generate", "--prompt", "", "--no-chat-template", "--max-new-tokens", "2"])
    assert "--prompt is empty" in message


def _chat(monkeypatch, capsys, tiny_pair, data: bytes, *argv: str) -> tuple[int, str]:
    import lacache.lab.models

    monkeypatch.setattr(lacache.lab.models, "load_model", lambda *a, **k: tiny_pair)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
    code = main(["chat", "--max-new-tokens", "3", "--temperature", "0", *argv])
    return code, capsys.readouterr().out


def test_chat_skips_a_line_that_is_not_utf8_and_goes_on(monkeypatch, capsys, tiny_pair):
    code, out = _chat(monkeypatch, capsys, tiny_pair, b"caf\xe9 au lait?\n/stats\n")
    assert code == 0
    assert "[could not decode that line as utf-8; it was skipped, type it again]" in out
    assert "[stats]" in out and "0 turns" in out  # the session went on; the bad line was not a turn


def test_chat_answers_the_good_lines_around_a_bad_one(monkeypatch, capsys, tiny_pair):
    code, out = _chat(monkeypatch, capsys, tiny_pair, "Hi \u00e9!\n".encode() + b"\xff\xfe\n" + b"Again?\n/stats\n")
    assert code == 0
    assert out.count("could not decode") == 1 and "2 turns" in out


def test_options_and_variants_that_fit_are_accepted(monkeypatch, tmp_path, tiny_pair):
    """The checks refuse only what is wrong: a method's real option, for a method being run, passes."""
    import lacache.lab.models

    monkeypatch.setattr(lacache.lab.models, "load_model", _refuse_loading)
    with pytest.raises(Loaded):
        main(["eval", "ppl", "--methods", "full,lacache,h2o", "--option", "h2o.window=8", "--option",
              "lacache.span=2", "--variant", "g2=lacache,group=2", "--option", "g2.sinks=2",
              "--out", str(tmp_path / "o")])
    monkeypatch.setattr(lacache.lab.models, "load_model", lambda *a, **k: tiny_pair)
    assert main(["generate", "--method", "h2o", "--budget", "32", "--option", "h2o.window=8", "--max-new-tokens", "2",
                 "--quiet"]) == 0


# --------------------------------------------------------------------------------------------------
# Fuzzing: random and hostile values for every sub-command's options
# --------------------------------------------------------------------------------------------------

# Plausible values half the time, so runs get past argparse's type checks to the value checks behind them.
PLAUSIBLE = st.sampled_from(["1", "2", "3", "8", "32", "64", "0.5", "0.9", "1.0", "0"])
NUMBERS = st.one_of(
    PLAUSIBLE,
    PLAUSIBLE,
    st.integers(-(10**20), 10**20).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["-1", "1e309", "-0", "nan", "inf", "-inf", "NaN", "1_000", "0x10", "99999999999999999999999"]),
)
TEXT = st.one_of(
    st.sampled_from(["", " ", ",", ",,", "abc", "\u00fcn\u00efc\u00f8d\u00e9", "\u2603", "a b", "--", "-1,2", "1,,2",
                     "nan,1", "\u202e", "\U0001f600"]),
    st.text(max_size=12),
)
HOSTILE = st.one_of(NUMBERS, TEXT)
METHOD_NAMES = st.sampled_from([*registry.METHODS, "bogus", "", "lacache,bogus", "full,lacache", ",", "LACACHE"])
OPTION_KEYS = st.sampled_from(["sinks", "span", "overlap", "window", "salient", "group", "schedule", "bogus", "", "chunk"])
OPTIONS = st.one_of(
    st.builds(lambda m, k, v: f"{m}.{k}={v}", st.sampled_from([*registry.METHODS[:6], "bogus", ""]), OPTION_KEYS,
              HOSTILE),
    TEXT,
)
VARIANTS = st.one_of(
    st.builds(lambda n, b, k, v: f"{n}={b},{k}={v}", st.sampled_from(["g2", "lacache", "", "x y"]),
              st.sampled_from(["lacache", "streaming", "full", "bogus", ""]), OPTION_KEYS, HOSTILE),
    TEXT,
)
MODELS = st.sampled_from(["", "/nonexistent/model", "./nope", "missing.gguf", "SmolLM2-135M-Instruct", "someone/model",
                          "a/b/c", "bad id!", "~/nothing-here", "."])
DEVICES = st.sampled_from(["auto", "cpu", "cuda", "cuda:7", "bogus", "", "meta", "mps", "cpu:0", "xla", "cuda:-1"])


def _paths(tmp: Path) -> st.SearchStrategy[str]:
    return st.sampled_from(["", "/nonexistent/file", str(tmp), str(tmp / "bad.json"), str(tmp / "latin1.txt"),
                            str(tmp / "text.txt"), str(FIXTURE)])


# Each command: its fixed prefix, the options fuzzed (flag -> values), and what is always appended so a
# run that passes validation stays tiny (argparse keeps the last value given).
EVAL_COMMON = {"--methods": METHOD_NAMES, "--option": OPTIONS, "--variant": VARIANTS, "--model": MODELS,
               "--dtype": st.sampled_from(["float32", "bf16", "fp64"])}
PREFILL = {"--budget": NUMBERS, "--prefill": st.sampled_from(["full", "chunked", "bogus"]), "--prefill-chunk": NUMBERS}
SAMPLING = {"--temperature": NUMBERS, "--top-p": NUMBERS, "--seed": NUMBERS, "--budget": NUMBERS, "--sinks": NUMBERS,
            "--method": METHOD_NAMES, "--model": MODELS, "--max-new-tokens": NUMBERS}
BENCH_COMMON = {"--device": DEVICES, "--seed": NUMBERS, "--dtype": st.sampled_from(["float32", "bf16", "half"])}
MODEL_BENCH = {**BENCH_COMMON, "--model": MODELS, "--tiny-layers": NUMBERS, "--tiny-hidden": NUMBERS,
               "--tiny": None, "--option": OPTIONS, "--budget": NUMBERS, "--tokens": NUMBERS,
               "--prompt-tokens": NUMBERS, "--temperature": NUMBERS}


def _commands(tmp: Path) -> dict[str, tuple[list[str], dict, list[str]]]:
    paths = _paths(tmp)
    return {
        "generate": (["generate"], {**SAMPLING, "--span": NUMBERS, "--overlap": NUMBERS, "--option": OPTIONS,
                                    "--prompt": TEXT, "--no-chat-template": None, "--stop-at-eos": None},
                     ["--max-new-tokens", "3", "--quiet"]),
        "chat": (["chat"], {**SAMPLING, "--system": TEXT}, ["--max-new-tokens", "3"]),
        "ppl": (["eval", "ppl"], {**EVAL_COMMON, "--budgets": TEXT | NUMBERS, "--tokens": NUMBERS,
                                  "--texts": st.sampled_from(["essays", "kjv", "essays,nope", "", ","]),
                                  "--text-file": paths, "--step": NUMBERS, "--window": NUMBERS}, ["--no-progress"]),
        "passkey": (["eval", "passkey"], {**EVAL_COMMON, **PREFILL, "--lengths": TEXT | NUMBERS,
                                          "--depths": TEXT | NUMBERS, "--seeds": NUMBERS,
                                          "--filler": st.sampled_from(["grass", "essays", "bogus"])}, []),
        "ruler": (["eval", "ruler"], {**EVAL_COMMON, **PREFILL, "--lengths": TEXT | NUMBERS, "--seeds": NUMBERS,
                                      "--tasks": TEXT | st.sampled_from(["niah_multikey", "bogus"])}, []),
        "longbench": (["eval", "longbench", "--data", str(FIXTURE)], {**EVAL_COMMON, **PREFILL, "--data": paths, "--limit": NUMBERS,
                                              "--datasets": TEXT | st.sampled_from(["trec", "lcc,trec", "vcsum"]),
                                              "--max-length": NUMBERS, "--no-chat-template": None},
                      []),
        "decode": (["bench", "decode"], {**MODEL_BENCH, "--methods": METHOD_NAMES, "--window": NUMBERS}, ["--quiet"]),
        "memory": (["bench", "memory"], {**MODEL_BENCH, "--methods": METHOD_NAMES, "--from": paths}, ["--quiet"]),
        "stream": (["bench", "stream"], {**MODEL_BENCH, "--method": METHOD_NAMES, "--interval": NUMBERS,
                                         "--tolerance": NUMBERS, "--cache-only": None, "--layers": NUMBERS,
                                         "--kv-heads": NUMBERS, "--head-dim": NUMBERS}, ["--quiet"]),
        "cache": (["bench", "cache"], {**BENCH_COMMON, "--methods": TEXT | st.sampled_from(["lacache,reference"]),
                                       "--budgets": TEXT | NUMBERS, "--layers": TEXT | NUMBERS, "--kv-heads": NUMBERS,
                                       "--head-dim": NUMBERS, "--positions": TEXT, "--steps": NUMBERS,
                                       "--ref-steps": NUMBERS, "--warmup": NUMBERS}, ["--quiet"]),
        "prefill": (["bench", "prefill"], {**MODEL_BENCH, "--method": METHOD_NAMES, "--prefill-chunk": NUMBERS,
                                           "--random": None, "--compare-full": None}, ["--quiet"]),
        "all": (["bench", "all"], {"--device": DEVICES, "--model": MODELS, "--tiny": None,
                                   "--dtype": st.sampled_from(["float32", "bf16"])}, ["--quiet"]),
        "vllm": (["bench", "vllm"], {"--budget": NUMBERS, "--tokens": NUMBERS, "--model": MODELS, "--method": METHOD_NAMES,
                                     "--part": st.sampled_from(["stream", "both", "bogus"])}, []),
        "inspect": (["inspect"], {"--method": METHOD_NAMES, "--compare": METHOD_NAMES, "--budget": NUMBERS,
                                  "--tokens": NUMBERS, "--at": TEXT | NUMBERS, "--prompt": TEXT, "--prompt-file": paths,
                                  "--option": OPTIONS, "--model": MODELS,
                                  "--dtype": st.sampled_from(["float32", "bf16", "fp64"])}, ["--quiet"]),
        # a folder of no lacache results: the page is refused in one line whatever the options
        "report": (["report", str(tmp)], {"--title": TEXT, "--check": None}, []),
    }


_RUNS = itertools.count()


@pytest.fixture(scope="module")
def fuzz_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    (tmp / "bad.json").write_text("[1, 2]", encoding="utf-8")
    (tmp / "latin1.txt").write_bytes("caf\u00e9 ".encode("latin-1") * 20)
    (tmp / "text.txt").write_text("The quick brown fox. " * 20, encoding="utf-8")
    return tmp


@pytest.fixture
def fuzz_env(monkeypatch, fuzz_files, tiny_pair):
    """Loading stops with :class:`Loaded` except for generate/chat, which get the tiny model; the registry
    (which ``--variant`` extends) is restored after every run."""
    import lacache.lab.bench
    import lacache.lab.models

    for name in ("tiny_model", "bench_cache_update", "bench_cache_stream"):
        monkeypatch.setattr(lacache.lab.bench, name, _refuse_loading)
    return fuzz_files, monkeypatch, tiny_pair


def _run_fuzzed(env, capsys, prefix: list[str], argv: list[str], tail: list[str], stdin: bytes = b"") -> str:
    """Run one command line; assert it ended well and say how: "loaded", "ok", "error" or "usage"."""
    tmp, monkeypatch, tiny_pair = env
    import lacache.lab.models

    interactive = prefix[0] in ("generate", "chat")
    monkeypatch.setattr(lacache.lab.models, "load_model", (lambda *a, **k: tiny_pair) if interactive else _refuse_loading)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    out = [] if interactive else ["--out", str(tmp / f"out{next(_RUNS)}")]
    methods, names = dict(registry._BY_NAME), registry.METHODS
    full = [*prefix, *argv, *tail, *out]
    outcome = None
    try:
        code = main(full)
    except Loaded:
        code, outcome = 0, "loaded"
    except SystemExit as exit_:  # argparse's own usage errors
        assert exit_.code in (0, 2), full
        capsys.readouterr()
        return "usage"
    finally:
        registry._BY_NAME.clear()
        registry._BY_NAME.update(methods)
        registry.METHODS = names
    err = capsys.readouterr().err
    assert "Traceback" not in err, full
    errors = [line for line in err.splitlines() if line.startswith("lacache: error:")]
    if code == 0:
        assert errors == [], full
        return outcome or "ok"
    assert code == 2 and len(errors) == 1, (full, err)
    return "error"


@st.composite
def _argv(draw, options: dict) -> list[str]:
    """Some of ``options`` (a flag with no values is a switch), in a random order, each with a drawn value."""
    flags = draw(st.lists(st.sampled_from(sorted(options)), max_size=4))
    argv = []
    for flag in flags:
        values = options[flag]
        argv += [flag] if values is None else [flag, draw(values)]
    return argv


# 40 fixed examples per command keep the file near 20 s on 2 cores; LACACHE_FUZZ_EXAMPLES=500 explores
# further, with fresh random examples each run.
_EXAMPLES = int(os.environ.get("LACACHE_FUZZ_EXAMPLES", "0"))
FUZZ_SETTINGS = settings(max_examples=_EXAMPLES or 40, deadline=None, database=None, derandomize=not _EXAMPLES,
                         suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.mark.parametrize("command", ["generate", "chat", "ppl", "passkey", "ruler", "longbench", "decode", "memory",
                                     "stream", "cache", "prefill", "all", "vllm", "inspect", "report"])
@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzzed_arguments_never_end_in_a_traceback(fuzz_env, capsys, command, data):
    prefix, options, tail = _commands(fuzz_env[0])[command]
    argv = data.draw(_argv(options), label="argv")
    stdin = b""
    if command == "chat":
        stdin = data.draw(st.lists(st.sampled_from([b"Hi!\n", b"\xff\xfe oops\n", b"/stats\n", b"/reset\n", b"/nope\n",
                                                    "caf\u00e9?\n".encode(), b"\n", b"/quit\n"]), max_size=4),
                          label="stdin")
        stdin = b"".join(stdin)
    event(_run_fuzzed(fuzz_env, capsys, prefix, argv, tail, stdin))  # see --hypothesis-show-statistics


def test_the_fuzz_harness_tells_the_outcomes_apart(fuzz_env, capsys):
    """The harness itself: valid lines reach loading (or run, for generate/chat), bad ones are one line."""
    assert _run_fuzzed(fuzz_env, capsys, ["eval", "passkey"], ["--budget", "0.5"], []) == "loaded"
    assert _run_fuzzed(fuzz_env, capsys, ["bench", "cache"], ["--budgets", "64"], []) == "loaded"
    assert _run_fuzzed(fuzz_env, capsys, ["eval", "passkey"], ["--budget", "nan"], []) == "error"
    assert _run_fuzzed(fuzz_env, capsys, ["eval", "passkey"], ["--budget"], []) == "usage"
    assert _run_fuzzed(fuzz_env, capsys, ["generate"], ["--prompt", "\u2603 \U0001f600 \u202e", "--top-p", "1"],
                       ["--max-new-tokens", "3", "--quiet"]) == "ok"
    assert _run_fuzzed(fuzz_env, capsys, ["chat"], [], ["--max-new-tokens", "3"], b"Hi\n\xff\n") == "ok"
