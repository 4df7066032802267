"""The compile benchmark (``lacache bench compile``) and the unattended GPU script's CPU smoke mode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lacache.cli import bench as bench_cli
from test_bench import _parse

ROOT = Path(__file__).resolve().parents[1]


def test_bench_compile_interleaves_every_setup_and_writes_its_files(tmp_path):
    out = tmp_path / "bc"
    payload = bench_cli.run_cli(_parse(["bench", "compile", "--tiny", "--budget", "24", "--window", "3", "--rounds", "2",
                                        "--backend", "aot_eager", "--out", str(out), "--quiet"]))
    setups = ["full", "StaticCache", "StaticCache compiled", "lacache", "lacache static", "lacache static compiled",
              "streaming", "streaming static", "streaming static compiled"]
    assert sorted(r["setup"] for r in payload["summary"]) == sorted(setups)
    assert [r["setup"] for r in payload["rows"]] == [r["setup"] for r in payload["rows"][:9]] * 2  # interleaved
    by_name = {r["setup"]: r for r in payload["summary"]}
    assert by_name["StaticCache compiled"]["vs_compiled_static_cache"] == 1.0
    assert by_name["lacache"]["vs_eager_host_path"] == 1.0 and by_name["full"]["vs_eager_host_path"] is None
    assert all(r["ms_per_token"] > 0 for r in payload["rows"])
    for name in ("compile.json", "compile.csv", "compile.md", "compile.png"):
        assert (out / name).stat().st_size > 0
    assert json.loads((out / "compile.json").read_text())["settings"]["backend"] == "aot_eager"


def test_bench_compile_refuses_content_aware_methods_and_too_many_steps(tmp_path):
    common = ["--tiny", "--budget", "24", "--backend", "aot_eager", "--out", str(tmp_path), "--quiet"]
    with pytest.raises(ValueError, match="static=True"):
        bench_cli.run_cli(_parse(["bench", "compile", "--methods", "tova", *common]))
    with pytest.raises(ValueError, match="--rounds x --window"):
        bench_cli.run_cli(_parse(["bench", "compile", "--rounds", "50", *common]))


def test_the_gpu_script_runs_its_cpu_smoke_mode(tmp_path):
    """scripts/gpu_bench.py has not met a GPU here: its smoke mode runs the same code on a tiny model."""
    out = tmp_path / "smoke.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_bench.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    seen = {(r["context"], r["cache"], r["compiled"]) for r in result["rows"]}
    for context in (64, 128):
        for cache, compiled in (("full", False), ("StaticCache", False), ("StaticCache", True), ("lacache", False),
                                ("lacache", True), ("streaming", False), ("streaming", True)):
            assert (context, cache, compiled) in seen
    assert "| context | cache | compiled | ms/token |" in done.stdout
