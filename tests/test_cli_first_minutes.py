"""What a newcomer meets first: instant help and errors, the bundled names, no silent no-ops, Ctrl-C."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import lacache.lab.models
from conftest import bundled_tokenizer_and_tiny_model
from lacache.cli.common import note_if_nothing_evicted
from lacache.cli.main import main

_PROBE = """
import sys
from lacache.cli.main import main
try:
    rc = main(sys.argv[1:])
except SystemExit as stop:
    rc = stop.code
print("RESULT", rc, "torch" in sys.modules, "transformers" in sys.modules)
"""


def _run_cli(*argv: str) -> tuple[int, bool, bool, str]:
    """(exit status, torch imported, transformers imported, stderr) of ``lacache argv`` in a fresh process.

    What keeps help and argument errors instant is that they import neither torch nor transformers
    (torch alone takes 3-30 s to import): that is asserted, not the wall time, which a busy machine
    stretches for reasons the code does not control."""
    done = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, timeout=120)
    result = [line for line in done.stdout.splitlines() if line.startswith("RESULT")][-1].split()
    return int(result[1]), result[2] == "True", result[3] == "True", done.stderr


@pytest.mark.parametrize("argv", [
    ["--help"], ["generate", "--help"], ["eval", "passkey", "--help"], ["bench", "compile", "--help"],
    ["generate", "--budgt", "3"],  # an argument typo
    ["generate", "--budget", "zero"],  # a bad value
    ["generate", "--model", "SmolLM2-135M"],  # a misspelt bundled model
])
def test_help_and_argument_errors_import_neither_torch_nor_transformers(argv):
    rc, torch_loaded, transformers_loaded, err = _run_cli(*argv)
    assert rc in (0, 2), err
    assert not torch_loaded and not transformers_loaded


@pytest.mark.parametrize("typed, meant", [
    ("SmolLM2-135M", "SmolLM2-135M-Instruct"), ("smollm2-135m-instruct", "SmolLM2-135M-Instruct"),
    ("SmolLM2", "SmolLM2-135M-Instruct"), ("gemma-3-270", "gemma-3-270m"), ("Gemma3-270M", "gemma-3-270m"),
])
def test_a_name_like_a_bundled_model_is_answered_at_once_with_the_bundled_names(capsys, typed, meant):
    assert main(["generate", "--model", typed, "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert f"--model {typed}: " in err and f"did you mean --model {meant}?" in err
    assert "SmolLM2-135M-Instruct" in err and "gemma-3-270m" in err


def test_a_hub_id_is_not_taken_for_a_misspelt_bundled_name():
    from lacache.lab.bundled import resembling_bundled

    assert resembling_bundled("HuggingFaceTB/SmolLM2-135M-Instruct") is None
    assert resembling_bundled("gpt2") is None and resembling_bundled("Qwen2.5-0.5B") is None


def test_a_missing_prompt_file_is_named_by_the_option_typed(capsys):
    assert main(["inspect", "--prompt-file", "nope.txt"]) == 2
    err = capsys.readouterr().err
    assert "--prompt-file nope.txt does not exist" in err and "leave --prompt-file out" in err
    assert "--text-file" not in err


def test_a_budget_that_evicts_nothing_is_said_in_one_line(capsys):
    assert note_if_nothing_evicted(1000, 400, "of this prompt")
    assert "--budget 1000 >= the 400 tokens of this prompt: nothing is evicted" in capsys.readouterr().err
    assert not note_if_nothing_evicted(256, 400, "of this prompt")
    assert not note_if_nothing_evicted(0.5, 400, "of this prompt")  # a fraction of the prompt always evicts
    assert note_if_nothing_evicted(1000.0, 300, "of the longest prompt")  # eval's --budget is a float


@pytest.fixture(scope="module")
def tiny_pair():
    tokenizer, model = bundled_tokenizer_and_tiny_model(layers=2)
    return model, tokenizer


def test_generate_says_when_its_budget_evicts_nothing(monkeypatch, capsys, tiny_pair):
    monkeypatch.setattr(lacache.lab.models, "load_model", lambda *a, **k: tiny_pair)
    assert main(["generate", "--prompt", "Once upon a time", "--budget", "512", "--max-new-tokens", "4"]) == 0
    assert "nothing is evicted" in capsys.readouterr().err
    assert main(["generate", "--prompt", "Once upon a time", "--budget", "16", "--max-new-tokens", "30"]) == 0
    err = capsys.readouterr().err
    assert "nothing is evicted" not in err and " MiB" in err and " MB" not in err


def test_ctrl_c_in_generate_keeps_the_text_and_prints_the_stats(monkeypatch, capsys, tiny_pair, tmp_path):
    """Ctrl-C after some tokens: they stay on stdout, the stats line and --json say so, exit status 130."""
    import lacache.cache.generation as generation  # run_cli imports stream_tokens from here at each call

    original = generation.stream_tokens

    def interrupted(*args, **kwargs):
        for produced, token in enumerate(original(*args, **kwargs), 1):
            yield token
            if produced == 5:
                raise KeyboardInterrupt

    monkeypatch.setattr(lacache.lab.models, "load_model", lambda *a, **k: tiny_pair)
    monkeypatch.setattr(generation, "stream_tokens", interrupted)
    report = tmp_path / "run.json"
    assert main(["generate", "--prompt", "Once upon a time", "--budget", "16", "--max-new-tokens", "50",
                 "--json", str(report)]) == 130
    captured = capsys.readouterr()
    assert captured.out.strip()  # the five tokens' text
    assert "5 tokens (interrupted)" in captured.err
    assert json.loads(report.read_text())["interrupted"] is True
