"""An evaluation split across processes (torchrun / accelerate launch) gives the single-process result.

The unit tests pin the assignment of work to processes, the merge back into one order and the
per-process records; the end-to-end tests launch ``torchrun --nproc-per-node 2`` on the CPU (gloo)
with a tiny saved model and compare its files with one process's, for pass-key trials and for
perplexity runs, and resume an interrupted two-process run in one process. The launches are the
integration tier (``-m integration``): conftest marks the tests using ``launched``, the accelerate
launch is marked where it is defined.
"""

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lacache.cli.main import main as cli_main
from lacache.lab.evaluation.checkpoint import RunProgress, part_path, progress_path, read_record
from lacache.lab.evaluation.distributed import SINGLE, WAIT, Shard, join, merge, shard_from_environment

# --- assignment and merge ------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_item_has_exactly_one_owner_and_shares_are_even(world):
    prompts, methods = 7, 3
    shards = [Shard(rank, world) for rank in range(world)]
    for p in range(prompts):
        for m in range(methods):
            assert [s.owns(p, m) for s in shards].count(True) == 1
            assert shards[(p + m) % world].owns(p, m)  # the documented rule, so the split is reproducible
    shares = [s.share(prompts, methods) for s in shards]
    assert sum(shares) == prompts * methods and max(shares) - min(shares) <= 1
    configs = [[c for c in range(5) if s.owns(c)] for s in shards]  # the ppl grid: one index per run
    assert sorted(c for mine in configs for c in mine) == list(range(5))


def test_each_process_gets_every_method_not_one_method_each():
    """With as many methods as processes, plain round-robin would give all trials of a method to one process
    (the full cache's cost to one, the bounded one's to the other); the diagonal rule mixes them."""
    for rank in range(2):
        mine = [(p, m) for p in range(4) for m in range(2) if Shard(rank, 2).owns(p, m)]
        assert {m for _, m in mine} == {0, 1} and len(mine) == 4


def test_merge_restores_the_single_process_order():
    grid = [(p, m) for p in range(5) for m in range(3)]
    rows = [f"prompt {p} method {m}" for p, m in grid]
    for world in (1, 2, 3):
        parts = [[((p, m), f"prompt {p} method {m}") for p, m in grid if Shard(rank, world).owns(p, m)]
                 for rank in reversed(range(world))]  # arrival order does not matter
        assert merge(parts) == rows
    with pytest.raises(RuntimeError, match=r"position \(0, 1\)"):
        merge([[((0, 1), "a")], [((0, 1), "b")]])


def test_the_launch_is_read_from_the_environment():
    assert shard_from_environment({}) == SINGLE and not SINGLE.distributed and SINGLE.main
    shard = shard_from_environment({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert shard == Shard(3, 4, 1, launched=True) and shard.distributed and not shard.main
    assert shard_from_environment({"WORLD_SIZE": "2", "RANK": "1"}).local_rank == 1
    alone = shard_from_environment({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"})  # torchrun of one process
    assert alone.launched and not alone.distributed
    with pytest.raises(ValueError, match="WORLD_SIZE='two' must be an integer"):
        shard_from_environment({"WORLD_SIZE": "two"})
    with pytest.raises(ValueError, match="RANK=2 and WORLD_SIZE=2 .*torchrun --nproc-per-node 2"):
        shard_from_environment({"WORLD_SIZE": "2", "RANK": "2"})


def test_join_refuses_an_accelerate_state_that_does_not_count_the_launch(monkeypatch):
    """accelerate's PartialState is one per process and picks its backend from the devices it sees: built without
    ``cpu=True`` on a CPU-only machine it reports one process, and gather_object would then hand each process only
    its own rows. join asks for cpu=True there and refuses a state that disagrees with the launcher."""
    import accelerate
    import torch

    built = []

    class OneProcess:
        num_processes, process_index, distributed_type = 1, 0, "DistributedType.NO"

        def __init__(self, **kwargs):
            built.append(kwargs)

    monkeypatch.setattr(accelerate, "PartialState", OneProcess)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"accelerate joined process 0 of 1 .* RANK=1 of WORLD_SIZE=2"):
        join({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"})
    assert built[0]["cpu"] is True and built[0]["timeout"] == WAIT
    assert join({}) == SINGLE and len(built) == 1  # one process: nothing joined, accelerate not asked


def test_bench_refuses_to_run_split(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert cli_main(["bench", "cache", "--out", "unused"]) == 2
    assert "WORLD_SIZE=2" in capsys.readouterr().err


# --- the per-process records ---------------------------------------------------------------------------------


def _open(folder, part=None, resume=False):
    return RunProgress.open(folder, "demo", "eval demo", {"model": "m"}, resume=resume, part=part)


def test_per_process_records_resume_anywhere_and_fold_into_one(tmp_path, capsys):
    main, other = _open(tmp_path), _open(tmp_path, part=1)
    main.save()
    main.add(("a",), 1)
    other.add(("b",), 2)
    assert other.path == part_path(tmp_path, "demo", 1) and main.path == progress_path(tmp_path, "demo")
    # an interrupted two-process run: refused without --resume, naming both kinds of record
    with pytest.raises(ValueError, match=r"2 finished trials.*1 per-process record.*demo.rank\*.progress.json"):
        _open(tmp_path)
    # resumed by one process: it sees both, and finishing folds the other's record into the main one
    again = _open(tmp_path, resume=True)
    assert again.finished == {("a",): 1, ("b",): 2}
    assert "2 finished trials" in capsys.readouterr().err
    again.add(("c",), 3)
    again.finish()
    assert not part_path(tmp_path, "demo", 1).exists()
    record = read_record(progress_path(tmp_path, "demo"))
    assert record["complete"] and sorted(e["key"][0] for e in record["finished"]) == ["a", "b", "c"]
    _open(tmp_path)  # complete: a fresh run may start over


def test_a_resumed_process_keeps_its_own_record_and_sees_everyone_elses(tmp_path):
    _open(tmp_path).add(("a",), 1)
    _open(tmp_path, part=2, resume=True).add(("b",), 2)
    third = _open(tmp_path, part=2, resume=True)  # resumed again, e.g. by a later two-process launch
    assert third.finished == {("a",): 1, ("b",): 2} and third.count == 1
    third.finish()  # only the main process completes the run
    assert part_path(tmp_path, "demo", 2).exists()
    with pytest.raises(ValueError, match="model: recorded 'm', now 'n'"):
        RunProgress.open(tmp_path, "demo", "eval demo", {"model": "n"}, resume=True, part=1)


# --- two processes on the CPU --------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_thread")  # as the launched processes compute


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _torchrun(*command: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 COMMAND`` on the CPU, one thread per process."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(_free_port()), *command]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)


def _passkey_argv(model: Path, out: Path) -> list[str]:
    return ["eval", "passkey", "--model", str(model), "--lengths", "100,120", "--depths", "0,0.5,1", "--seeds", "1",
            "--methods", "full,streaming,lacache", "--budget", "0.5", "--out", str(out)]


def _ppl_argv(model: Path, text: Path, out: Path) -> list[str]:
    return ["eval", "ppl", "--model", str(model), "--text-file", str(text), "--tokens", "80", "--budgets", "32,48",
            "--methods", "full,streaming,lacache", "--window", "40", "--out", str(out)]


def _csv(path: Path, drop: tuple[str, ...] = ()) -> list[dict]:
    with open(path, newline="") as fh:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(fh)]


def _payload(path: Path, rows: str) -> dict:
    """A results JSON without what may differ between two runs of one command: timings and run metadata."""
    payload = json.loads(path.read_text())
    payload.pop("run", None)
    for row in payload[rows]:
        row.pop("seconds")
    return payload


# Runs several commands in each launched process (one start-up for all) and makes process 1 raise
# KeyboardInterrupt (as Ctrl-C would) at its third answer of the last command, as an interrupted run.
DRIVER = """
import json, os, sys
import lacache.lab.evaluation.passkey as passkey
from lacache.cli.main import main
commands = json.loads(sys.argv[1])
for argv in commands[:-1]:
    if main(argv):
        sys.exit(1)
answers, real = [], passkey.greedy_answer
def interrupted(*args, **kwargs):
    answers.append(1)
    if os.environ["RANK"] == "1" and len(answers) == 3:
        raise KeyboardInterrupt
    return real(*args, **kwargs)
passkey.greedy_answer = interrupted
sys.exit(main(commands[-1]))
"""


@pytest.fixture(scope="module")
def launched(tiny_model_dir, tmp_path_factory):
    """``torchrun --nproc-per-node 2 -m lacache eval passkey``; then, in a second launch, ``eval ppl`` and a
    passkey run interrupted in process 1."""
    root = tmp_path_factory.mktemp("launched")
    text = root / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    whole = _torchrun("-m", "lacache", *_passkey_argv(tiny_model_dir, root / "passkey"))
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    commands = [_ppl_argv(tiny_model_dir, text, root / "ppl"), _passkey_argv(tiny_model_dir, root / "interrupted")]
    cut = _torchrun(str(driver), json.dumps(commands))
    return {"root": root, "text": text, "whole": whole, "cut": cut}


def test_two_processes_give_the_single_process_passkey_results(launched, tiny_model_dir, tmp_path, capsys):
    whole, out = launched["whole"], launched["root"] / "passkey"
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert cli_main(_passkey_argv(tiny_model_dir, tmp_path)) == 0
    single = capsys.readouterr()
    drop = ("seconds",)
    assert _csv(out / "passkey.csv", drop) == _csv(tmp_path / "passkey.csv", drop)  # same rows, same order
    assert _payload(out / "passkey.json", "trials") == _payload(tmp_path / "passkey.json", "trials")
    assert whole.stdout == single.out  # one table, printed once
    # only rank 0 spoke, about its own share (9 of the 18 trials); one record, complete, no per-process ones
    assert "[rank 0 of 2]" in whole.stderr and "/9 trials" in whole.stderr
    assert whole.stderr.count("[lacache] wrote") == 1 and whole.stderr.count("Loading weights: 100%") <= 1
    record = read_record(progress_path(out, "passkey"))
    assert record["complete"] and len(record["finished"]) == 18
    assert sorted(p.name for p in out.iterdir()) == sorted(["passkey.csv", "passkey.json", "passkey.png",
                                                            progress_path(out, "passkey").name])


def test_two_processes_give_the_single_process_perplexities(launched, tiny_model_dir, tmp_path):
    cut, out = launched["cut"], launched["root"] / "ppl"
    assert (out / "ppl.csv").exists(), cut.stderr[-3000:]
    assert cli_main(_ppl_argv(tiny_model_dir, launched["text"], tmp_path)) == 0
    assert _csv(out / "ppl.csv") == _csv(tmp_path / "ppl.csv")  # every window's perplexity, to the last digit
    assert _payload(out / "ppl.json", "results") == _payload(tmp_path / "ppl.json", "results")


def test_an_interrupted_two_process_run_resumes_in_one_process(launched, tiny_model_dir, tmp_path, capsys):
    cut, out = launched["cut"], launched["root"] / "interrupted"
    assert cut.returncode != 0 and not (out / "passkey.csv").exists()
    main = read_record(progress_path(out, "passkey"))
    other = read_record(part_path(out, "passkey", 1))
    assert not main["complete"] and len(other["finished"]) == 2  # process 1 kept the two it finished
    argv = _passkey_argv(tiny_model_dir, out)
    assert cli_main(argv) == 2
    assert "unfinished run" in capsys.readouterr().err
    assert cli_main([*argv, "--resume"]) == 0
    assert "per-process records beside it reused" in capsys.readouterr().err
    assert cli_main(_passkey_argv(tiny_model_dir, tmp_path)) == 0
    assert _csv(out / "passkey.csv", ("seconds",)) == _csv(tmp_path / "passkey.csv", ("seconds",))
    assert not part_path(out, "passkey", 1).exists()
    assert read_record(progress_path(out, "passkey"))["complete"]


@pytest.mark.integration  # launches inline, not through the `launched` fixture conftest marks by name
def test_accelerate_launch_gives_the_single_process_passkey_results(tiny_model_dir, tmp_path):
    """The launcher lm-eval-harness users know: ``accelerate launch --multi_gpu --num_processes 2 -m lacache``
    (on this CPU-only machine its torch-elastic launcher starts two gloo processes)."""
    argv = ["eval", "passkey", "--model", str(tiny_model_dir), "--lengths", "100", "--depths", "0,1", "--seeds", "1",
            "--methods", "full,lacache", "--budget", "0.5", "--quiet"]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(_free_port()), "-m", "lacache"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    launched = subprocess.run([*launcher, *argv, "--out", str(tmp_path / "two")], capture_output=True, text=True,
                              timeout=180, env=env)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert cli_main([*argv, "--out", str(tmp_path / "one")]) == 0
    drop = ("seconds",)
    assert _csv(tmp_path / "two" / "passkey.csv", drop) == _csv(tmp_path / "one" / "passkey.csv", drop)
    assert json.loads((tmp_path / "two" / "passkey.json").read_text())["run"]["world_size"] == "2"
