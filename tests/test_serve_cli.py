"""``lacache serve``: its arguments become ``vllm serve`` arguments with one ``additional_config``, and a bad
setting is refused in one line before vLLM is imported. Runs without vLLM (the launch itself is
replaced here; tests/serving/test_vllm_serve.py starts a real server)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lacache.cli.serve as serve
from lacache.cli.main import main, parse_args


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A model folder as far as lacache serve reads one: a config.json with 30 layers."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"num_hidden_layers": 30, "model_type": "llama"}))
    return folder


@pytest.fixture
def launch(monkeypatch):
    """Replace the vLLM launch; what it would have been given (and the environment then) is recorded."""
    calls = []

    def fake_run(argv):
        folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        calls.append({"argv": argv, "prometheus_dir": folder,
                      "dir_was_empty": folder is not None and os.path.isdir(folder) and not os.listdir(folder)})

    monkeypatch.setattr(serve, "_vllm_installed", lambda: True)
    monkeypatch.setattr(serve, "_run_vllm", fake_run)
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.delitem(sys.modules, "prometheus_client", raising=False)  # as in a fresh `lacache serve`
    return calls


def _additional(argv: list[str]) -> dict:
    assert argv.count("--additional-config") == 1, argv
    return json.loads(argv[argv.index("--additional-config") + 1])


def test_help_lists_the_command_and_its_metrics(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    top = capsys.readouterr().out
    assert "serve" in top.split("positional arguments")[1] and "vLLM's OpenAI-compatible server" in top
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    for word in ("--budget", "--method", "--option", "--vllm-help", "lacache_compactions_total",
                 "lacache_evicted_tokens_total", "--dtype float32", "--no-reuse", "lacache_reused_tokens_total",
                 "lacache_kept_caches"):
        assert word in text, word


def test_arguments_become_vllm_arguments(launch, model_dir):
    argv = ["serve", str(model_dir), "--budget", "64", "--port", "8123", "--method", "streaming",
            "--option", "sinks=2", "--max-model-len", "512", "--option", "streaming.chunk=none", "-tp", "1"]
    assert main(argv) == 0
    (call,) = launch
    got = call["argv"]
    # the model first, the default, the user's own arguments in their order, one additional_config last
    assert got[:-2] == [str(model_dir), "--enforce-eager", "--dtype", "float32", "--enable-prompt-tokens-details",
                        "--port", "8123", "--max-model-len", "512", "-tp", "1"]
    assert _additional(got) == {"lacache": {"method": "streaming", "budget": 64, "sinks": 2, "chunk": None}}
    # prometheus_client's multiprocess folder: set (fresh and empty) while vLLM runs, gone afterwards
    assert call["prometheus_dir"] and call["dir_was_empty"]
    assert not os.path.exists(call["prometheus_dir"]) and "PROMETHEUS_MULTIPROC_DIR" not in os.environ


def test_the_method_defaults_to_the_serving_default(launch, model_dir):
    assert main(["serve", "--budget", "128", "--model", str(model_dir), "--port", "9000"]) == 0
    got = launch[0]["argv"]
    assert got[0] == str(model_dir) and "--model" not in got
    assert _additional(got) == {"lacache": {"method": "keydiff", "budget": 128}}
    # a half-precision --dtype gets the half-precision default (rules that rank keys are refused there)
    for dtype in (["--dtype", "bfloat16"], ["--dtype=float16"], ["--dtype", "auto"]):
        assert main(["serve", str(model_dir), "--budget", "128", *dtype]) == 0
        assert _additional(launch[-1]["argv"]) == {"lacache": {"method": "lacache-capped", "budget": 128}}, dtype
    assert main(["serve", str(model_dir), "--budget", "128", "--dtype", "float32"]) == 0
    assert _additional(launch[-1]["argv"])["lacache"]["method"] == "keydiff"


def test_no_reuse_switches_off_the_kept_caches(launch, model_dir):
    assert main(["serve", str(model_dir), "--budget", "64", "--no-reuse"]) == 0
    assert _additional(launch[0]["argv"]) == {"lacache": {"method": "keydiff", "budget": 64, "reuse": False}}


def test_users_settings_win_over_the_defaults(launch, model_dir):
    assert main(["serve", str(model_dir), "--budget", "64", "--no-enforce-eager"]) == 0
    assert main(["serve", str(model_dir), "--budget", "64", "--enforce-eager"]) == 0
    off, on = launch[0]["argv"], launch[1]["argv"]
    assert "--enforce-eager" not in off and "--no-enforce-eager" in off
    assert on.count("--enforce-eager") == 1
    assert main(["serve", str(model_dir), "--budget", "64", "--dtype", "bfloat16",
                 "--no-enable-prompt-tokens-details"]) == 0
    mine = launch[2]["argv"]
    assert "float32" not in mine and "--enable-prompt-tokens-details" not in mine


def test_users_own_additional_config_is_merged_not_overridden(launch, model_dir):
    assert main(["serve", str(model_dir), "--budget", "64", "--additional-config", '{"other": {"a": 1}}',
                 "--additional-config.other.b", "2", "--additional_config=" + json.dumps({"flag": True})]) == 0
    got = launch[0]["argv"]
    assert _additional(got) == {"other": {"a": 1, "b": 2}, "flag": True,
                                "lacache": {"method": "keydiff", "budget": 64}}
    assert not any(arg.startswith(("--additional-config.", "--additional_config")) for arg in got)


def test_the_bundled_model_is_the_default_and_gets_a_short_name(launch, monkeypatch, tmp_path):
    import lacache.lab.models as models

    bundled = tmp_path / "bundled"
    bundled.mkdir()
    (bundled / "config.json").write_text(json.dumps({"num_hidden_layers": 30}))
    monkeypatch.setattr(models, "default_model_dir", lambda: bundled)
    for model in ([], ["default"]):
        assert main(["serve", *model, "--budget", "64", "--port", "9000"]) == 0
    assert main(["serve", "--budget", "64", "--served-model-name", "mine"]) == 0
    first, second, named = (call["argv"] for call in launch)
    assert first == second
    assert first[:8] == [str(bundled), "--enforce-eager", "--dtype", "float32", "--enable-prompt-tokens-details",
                         "--served-model-name", models.DEFAULT_MODEL_NAME, "--port"]
    assert named.count("--served-model-name") == 1 and named[named.index("--served-model-name") + 1] == "mine"


def test_layers_are_read_from_the_models_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"num_hidden_layers": 12}}))
    assert serve.num_layers(str(tmp_path)) == 12
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 3}))
    with pytest.raises(ValueError, match="num_hidden_layers"):
        serve.num_layers(str(tmp_path))


@pytest.mark.parametrize("argv, says", [
    (["--budget", "0"], "budget=0 must be a positive integer"),
    (["--budget", "abc"], "--budget 'abc' must be a positive integer"),
    ([], "serve needs --budget N"),
    (["--budget", "64", "--method", "nope"], "method='nope' is not served in vLLM"),
    (["--budget", "64", "--method", "h2o"], "not served in vLLM"),
    (["--budget", "64", "--option", "bogus=1"], "unknown option(s) ['bogus']"),
    (["--budget", "64", "--option", "span"], "must look like KEY=VALUE"),
    (["--budget", "64", "--option", "streaming.sinks=2"], "'streaming' is not the method served here"),
    (["--budget", "64", "--option", "budget=9"], "give the budget with --budget"),
    (["--budget", "8", "--method", "lacache-capped", "--option", "sinks=4", "--option", "window=4"],
     "budget=8 is too small"),
    (["--budget", "8", "--option", "sinks=4", "--option", "window=9"], "budget=8 is smaller than sinks=4 + window=9"),
    (["--budget", "64", "--additional-config", '{"lacache": {"budget": 9}}'], "not in --additional-config"),
    (["--budget", "64", "--additional-config", "[1]"], "must be a JSON object"),
])
def test_bad_settings_are_one_line_and_exit_2_before_vllm(launch, model_dir, capsys, argv, says):
    assert main(["serve", str(model_dir), *argv, "--port", "9000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lacache: error: ") and says in err, err
    assert launch == []  # vLLM was never started
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ


def test_a_model_that_cannot_be_read_is_one_line(launch, tmp_path, capsys):
    for model in (str(tmp_path / "missing"), str(tmp_path)):  # no folder; a folder without config.json
        assert main(["serve", model, "--budget", "64"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"model {model}:" in err, err
    assert launch == []


def test_without_vllm_it_says_how_to_get_it(monkeypatch, model_dir, capsys):
    monkeypatch.setattr(serve, "_vllm_installed", lambda: False)
    monkeypatch.setattr(serve, "_run_vllm", lambda argv: pytest.fail("vLLM started"))
    assert main(["serve", str(model_dir), "--budget", "64"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lacache[vllm]" in err and "make vllm-env" in err


def test_other_commands_still_refuse_unknown_arguments(capsys):
    with pytest.raises(SystemExit) as done:
        parse_args(["generate", "--port", "8000"])
    assert done.value.code == 2 and "unrecognized arguments: --port 8000" in capsys.readouterr().err


def test_the_command_line_refuses_a_bad_budget_in_one_line(model_dir):
    """The installed entry point (``python -m lacache``), in a process of its own: exit status 2, one line."""
    done = subprocess.run([sys.executable, "-m", "lacache", "serve", str(model_dir), "--budget", "0", "--port", "9000"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        'lacache: error: lacache.budget=0 must be a positive integer (slots per layer), e.g. "budget": 256'], done.stderr
    assert done.stdout == ""
