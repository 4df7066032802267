"""Interrupted or misdirected runs keep their finished work.

A real SIGINT to a running ``lacache eval``/``bench`` keeps every finished trial on disk, exits 130
and says where they are; ``--resume`` then runs only what is missing and ends with the same results
as an uninterrupted run. A destination that cannot be written is refused before any model loads.
The files themselves are written atomically, and a run's journal is appended to (one line per
finished item), so keeping N items writes O(N) bytes; a line cut short by the interrupt is ignored,
and the one-document record of an earlier lacache still resumes.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lacache.cli.main import main as cli_main
from lacache.lab.evaluation.checkpoint import (
    RunProgress,
    atomic_write,
    check_output_file,
    check_output_folder,
    progress_path,
    read_record,
)

FIXTURE = Path(__file__).parent / "fixtures" / "longbench"

# Runs commands of the real command line one after another in one subprocess (one start-up, as each
# costs seconds), with some functions paced by a sleep so that a SIGINT lands reliably in the middle
# of a run (a tiny model would otherwise finish first). main() returns 130 on the interrupt; the
# driver reports that and goes on with the next command; its own exit status is the last command's.
DRIVER = """
import importlib, json, signal, sys, time
# a user's Ctrl-C: Python leaves SIGINT ignored when it starts with it ignored, as every command put in
# the background of a non-interactive shell does (`make test &` in a script)
signal.signal(signal.SIGINT, signal.default_int_handler)
plan = json.loads(sys.argv[1])
for module, name, delay in plan["paced"]:
    target = importlib.import_module(module)
    def paced(*args, _real=getattr(target, name), _delay=delay, **kwargs):
        time.sleep(_delay)
        return _real(*args, **kwargs)
    setattr(target, name, paced)
from lacache.cli.main import main
for argv in plan["commands"]:
    code = main(argv)
    print(f"exit {code}", flush=True)
    print("[driver] next command", file=sys.stderr, flush=True)
sys.exit(code)
"""

pytestmark = pytest.mark.usefixtures("one_thread")  # as the subprocesses compute


def _passkey_argv(model: Path, out: Path) -> list[str]:
    return ["eval", "passkey", "--model", str(model), "--lengths", "120", "--depths", "0,0.5,1", "--seeds", "1",
            "--methods", "full,lacache", "--budget", "0.5", "--out", str(out)]


def _ppl_argv(model: Path, text: Path, out: Path) -> list[str]:
    return ["eval", "ppl", "--model", str(model), "--text-file", str(text), "--tokens", "80", "--budgets", "32,48",
            "--methods", "full,streaming,lacache", "--window", "40", "--no-progress", "--out", str(out)]


def _decode_argv(out: Path) -> list[str]:
    return ["bench", "decode", "--tiny", "--tiny-layers", "2", "--tiny-hidden", "32", "--tokens", "20",
            "--budget", "24", "--window", "10", "--prompt-tokens", "32", "--methods", "full,streaming,lacache",
            "--device", "cpu", "--quiet", "--out", str(out)]


class Interrupted:
    """What one interrupted command left: its argv, folder, record, exit status and stderr."""

    def __init__(self, argv: list[str], out: Path, name: str, at_least: int):
        self.argv, self.out, self.record, self.at_least = argv, out, out / f"{name}.progress.jsonl", at_least

    def recorded(self) -> int:
        try:
            return len(read_record(self.record)["finished"])
        except (OSError, ValueError):
            return 0


@pytest.fixture(scope="module")
def interrupted(tiny_model_dir, tmp_path_factory):
    """Three commands, each sent a real SIGINT once some of its items were recorded."""
    root = tmp_path_factory.mktemp("interrupted")
    text = root / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    runs = {
        "passkey": Interrupted(_passkey_argv(tiny_model_dir, root / "passkey"), root / "passkey", "passkey", 3),
        "ppl": Interrupted(_ppl_argv(tiny_model_dir, text, root / "ppl"), root / "ppl", "ppl", 2),
        "decode": Interrupted(_decode_argv(root / "decode"), root / "decode", "decode", 1),
    }
    plan = {"paced": [["lacache.lab.evaluation.passkey", "greedy_answer", 0.3],
                      ["lacache.lab.evaluation.perplexity", "streaming_nll", 0.6],
                      ["lacache.lab.bench.decode", "stream_tokens", 0.6]],
            "commands": [run.argv for run in runs.values()]}
    stdout, stderr = root / "stdout.txt", root / "stderr.txt"
    with open(stdout, "w") as out, open(stderr, "w") as err:
        process = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(plan)], stdout=out, stderr=err,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            for run in runs.values():  # in order: each command starts once the one before has ended
                deadline = time.monotonic() + 60
                while run.recorded() < run.at_least and process.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.05)
                process.send_signal(signal.SIGINT)
            process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
    codes = [int(line.split()[1]) for line in stdout.read_text().splitlines() if line.startswith("exit ")]
    logs = stderr.read_text().split("[driver] next command")
    assert len(codes) == 3, stderr.read_text()[-3000:]
    for run, code, log in zip(runs.values(), codes, logs):
        run.returncode, run.stderr = code, log
    runs["decode"].process_returncode = process.returncode
    runs["text"] = text
    return runs


def _rows(path: Path, drop: tuple[str, ...] = ()) -> list[dict]:
    with open(path, newline="") as fh:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(fh)]


def _check_interrupted(run: Interrupted, total: int, final: str) -> None:
    """Exit 130, a message naming the folder and --resume, the finished items on disk, no final files yet."""
    assert run.returncode == 130, run.stderr[-2000:]
    message = run.stderr.strip().splitlines()[-1]
    assert "interrupted" in message and str(run.out) in message and "--resume" in message
    record = read_record(run.record)
    assert run.at_least <= len(record["finished"]) < total and record["complete"] is False
    assert not (run.out / final).exists()


def _check_refused_without_resume(argv: list[str], capsys) -> None:
    """The same command without --resume does not overwrite the unfinished run (and loads nothing)."""
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "unfinished run" in err and "--resume" in err


def test_sigint_during_eval_passkey_keeps_trials_and_resume_matches_an_uninterrupted_run(
        interrupted, tiny_model_dir, tmp_path, capsys):
    run = interrupted["passkey"]
    _check_interrupted(run, total=6, final="passkey.csv")
    _check_refused_without_resume(run.argv, capsys)
    assert cli_main([*run.argv, "--resume"]) == 0
    assert "reused" in capsys.readouterr().err
    reference = tmp_path / "reference"
    assert cli_main(_passkey_argv(tiny_model_dir, reference)) == 0
    assert _rows(run.out / "passkey.csv", drop=("seconds",)) == _rows(reference / "passkey.csv", drop=("seconds",))
    resumed, whole = (json.loads((d / "passkey.json").read_text()) for d in (run.out, reference))
    for payload in (resumed, whole):
        assert payload.pop("run")["command"][:3] == ["lacache", "eval", "passkey"]  # provenance differs
        for trial in payload["trials"]:
            trial.pop("seconds")
    assert resumed == whole
    assert read_record(run.record)["complete"] is True
    assert (run.out / "passkey.png").stat().st_size > 1000


def test_sigint_during_eval_ppl_keeps_runs_and_resume_matches_an_uninterrupted_run(
        interrupted, tiny_model_dir, tmp_path, capsys):
    run = interrupted["ppl"]
    _check_interrupted(run, total=5, final="ppl.csv")
    _check_refused_without_resume(run.argv, capsys)
    assert cli_main([*run.argv, "--resume"]) == 0
    reference = tmp_path / "reference"
    assert cli_main(_ppl_argv(tiny_model_dir, interrupted["text"], reference)) == 0
    assert _rows(run.out / "ppl.csv") == _rows(reference / "ppl.csv")
    resumed, whole = (json.loads((d / "ppl.json").read_text()) for d in (run.out, reference))
    for payload in (resumed, whole):
        assert payload.pop("run")["command"][:3] == ["lacache", "eval", "ppl"]  # provenance differs
        for result in payload["results"]:
            result.pop("seconds")
    assert resumed == whole


def test_sigint_during_bench_decode_keeps_methods_and_resume_completes(interrupted, tmp_path, capsys):
    run = interrupted["decode"]
    _check_interrupted(run, total=3, final="decode.csv")
    assert run.process_returncode == 130  # the exit status of the process, the last command's
    _check_refused_without_resume(run.argv, capsys)
    assert cli_main([*run.argv, "--resume"]) == 0
    reference = tmp_path / "reference"
    assert cli_main(_decode_argv(reference)) == 0
    measured = ("ms_per_token", "tokens_per_s", "rss_bytes", "peak_rss_bytes")  # timings and process memory
    for name in ("decode.csv", "memory.csv"):
        assert _rows(run.out / name, drop=measured) == _rows(reference / name, drop=measured)
    assert {r["method"] for r in _rows(run.out / "decode.csv")} == {"full", "streaming", "lacache"}


def test_interrupted_longbench_resumes_to_the_same_scores(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """The LongBench trial keys (dataset, position, id, method): Ctrl-C after two answers, then --resume."""
    import lacache.lab.evaluation.longbench as longbench

    argv = ["eval", "longbench", "--model", str(tiny_model_dir), "--data", str(FIXTURE), "--datasets", "trec,lcc",
            "--limit", "2", "--methods", "full,lacache", "--budget", "40", "--max-length", "90",
            "--out", str(tmp_path / "run")]
    real, calls = longbench.greedy_answer, []

    def interrupt_at_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(longbench, "greedy_answer", interrupt_at_the_third)
    assert cli_main(argv) == 130
    assert str(tmp_path / "run") in capsys.readouterr().err
    assert len(read_record(tmp_path / "run" / "longbench.progress.jsonl")["finished"]) == 2
    monkeypatch.setattr(longbench, "greedy_answer", real)
    assert cli_main([*argv, "--resume"]) == 0
    assert cli_main([*argv[:-1], str(tmp_path / "reference")]) == 0
    drop = ("seconds",)
    assert _rows(tmp_path / "run" / "longbench.csv", drop) == _rows(tmp_path / "reference" / "longbench.csv", drop)
    assert len(_rows(tmp_path / "run" / "longbench.csv")) == 8


def test_resume_refuses_other_settings_and_runs_only_new_methods(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import lacache.lab.evaluation.passkey as passkey

    argv = ["eval", "passkey", "--model", str(tiny_model_dir), "--lengths", "100", "--depths", "0.5", "--seeds", "1",
            "--methods", "full", "--out", str(tmp_path)]
    assert cli_main(argv) == 0
    capsys.readouterr()
    # a finished run is started over without --resume, as before
    assert cli_main(argv) == 0
    capsys.readouterr()
    # settings that change the meaning of a finished row must match
    assert cli_main([*argv, "--budget", "0.25", "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lacache: error: --resume") and "budget: recorded 0.5, now 0.25" in err
    # a method the record lacks just runs; the recorded one is reused, not answered again
    answered = []
    real = passkey.greedy_answer
    monkeypatch.setattr(passkey, "greedy_answer", lambda model, ids, method, *a: answered.append(method) or
                        real(model, ids, method, *a))
    assert cli_main([*argv[:-3], "full,streaming", "--out", str(tmp_path), "--resume"]) == 0
    assert answered == ["streaming"]
    assert [r["method"] for r in _rows(tmp_path / "passkey.csv")] == ["full", "streaming"]
    # a method's own options are part of what it measured
    assert cli_main([*argv[:-3], "full,streaming", "--option", "streaming.sinks=2", "--out", str(tmp_path),
                     "--resume"]) == 2
    assert "streaming: recorded" in capsys.readouterr().err


# --- destinations refused before any model loads ------------------------------------------------------------


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: a bad destination must be refused before that."""
    import lacache.lab.bench
    import lacache.lab.models

    monkeypatch.setattr(lacache.lab.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(lacache.lab.bench, "tiny_model", lambda *a, **k: pytest.fail("the model was built"))
    monkeypatch.setattr(lacache.lab.bench, "bench_cache_update", lambda *a, **k: pytest.fail("the benchmark ran"))


@pytest.mark.parametrize("command", [
    ["eval", "passkey"], ["eval", "ruler"], ["eval", "ppl"], ["eval", "longbench", "--data", str(FIXTURE)],
    ["bench", "decode", "--tiny"], ["bench", "stream", "--tiny"], ["bench", "prefill", "--tiny"],
    ["bench", "cache"], ["bench", "all", "--tiny"],
])
def test_an_out_that_is_a_file_is_refused_before_loading(command, no_model, tmp_path, capsys):
    taken = tmp_path / "results.csv"
    taken.write_text("not a folder")
    assert cli_main([*command, "--out", str(taken)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"lacache: error: --out '{taken}' is a file")
    assert taken.read_text() == "not a folder"


def test_an_out_below_a_file_is_refused_and_nothing_is_created(no_model, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    assert cli_main(["eval", "ppl", "--out", str(blocker / "runs" / "ppl")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out" in err and "cannot create" in err and str(blocker) in err
    assert sorted(os.listdir(tmp_path)) == ["blocker"]


@pytest.mark.parametrize("destination", ["folder", "below a file"])
def test_generate_json_destination_is_refused_before_loading(destination, no_model, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    path = tmp_path if destination == "folder" else tmp_path / "file" / "run.json"
    assert cli_main(["generate", "--json", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"lacache: error: --json '{path}'")


@pytest.fixture
def unwritable_folder(tmp_path):
    """A folder this process cannot create files in: read-only for a user; for root (who writes anywhere
    else) Linux's /proc, where no file can be created."""
    if os.name == "posix" and os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        yield locked
        locked.chmod(0o700)
    elif Path("/proc/self").is_dir():
        yield Path("/proc")
    else:
        pytest.skip("no folder here refuses this user's writes")


def test_a_folder_without_write_permission_is_refused(no_model, unwritable_folder, capsys):
    assert cli_main(["eval", "passkey", "--out", str(unwritable_folder / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out" in err and "cannot write" in err
    with pytest.raises(ValueError, match="--json .*cannot write"):
        check_output_file(unwritable_folder / "run.json", "--json")


def test_checks_create_nothing_and_accept_new_folders(tmp_path):
    target = tmp_path / "a" / "b"
    assert check_output_folder(target) == target and not (tmp_path / "a").exists()
    assert check_output_file(tmp_path / "c" / "run.json", "--json").name == "run.json"
    assert sorted(os.listdir(tmp_path)) == []  # the probe files are gone too


# --- the atomic writer and the record ---------------------------------------------------------------------


def test_atomic_write_replaces_the_whole_file_or_leaves_the_old_one(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")

    def fails_half_way(fh):
        fh.write("new and half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        atomic_write(path, fails_half_way)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["results.json"]
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, lambda fh: (fh.write("x"), (_ for _ in ()).throw(KeyboardInterrupt)))
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["results.json"]
    atomic_write(path, lambda fh: fh.write("new"))
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["results.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # the permissions open(path, "w") gives


def test_write_csv_interrupted_keeps_the_previous_results(tmp_path):
    from lacache.lab.evaluation.report import write_csv

    path = tmp_path / "rows.csv"
    write_csv(path, ["a"], [[1]])

    class Broken:
        def __iter__(self):
            yield [2]
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_csv(path, ["a"], Broken())
    assert path.read_text().splitlines() == ["a", "1"]


def test_run_progress_round_trip_and_refusals(tmp_path, capsys):
    settings = {"model": "m", "budget": 0.5}
    progress = RunProgress.open(tmp_path, "demo", "eval demo", settings, method_settings={"full": {}})
    progress.add((100, 0.5, 0, "full"), {"score": 1})
    with pytest.raises(ValueError, match="unfinished run .*--resume"):
        RunProgress.open(tmp_path, "demo", "eval demo", settings)
    again = RunProgress.open(tmp_path, "demo", "eval demo", settings, resume=True)
    assert again.finished == {(100, 0.5, 0, "full"): {"score": 1}}
    with pytest.raises(ValueError, match="model: recorded 'm', now 'other'"):
        RunProgress.open(tmp_path, "demo", "eval demo", {**settings, "model": "other"}, resume=True)
    with pytest.raises(ValueError, match="command"):
        RunProgress.open(tmp_path, "demo", "bench demo", settings, resume=True)
    again.finish()
    assert RunProgress.open(tmp_path, "demo", "eval demo", settings).finished == {}  # finished: start over
    (tmp_path / "demo.progress.jsonl").write_text("{broken")
    with pytest.raises(ValueError, match="delete it"):
        RunProgress.open(tmp_path, "demo", "eval demo", settings, resume=True)


# --- the journal: appended, torn lines ignored, earlier records resumed --------------------------------------


def _written_bytes() -> int | None:
    """Bytes this process has passed to write() so far (Linux), or None where the kernel does not say."""
    try:
        with open("/proc/self/io") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("wchar:"))
    except (OSError, StopIteration, ValueError):
        return None


def test_the_journal_is_appended_so_a_run_writes_bytes_in_proportion_to_its_items(tmp_path):
    row = {"score": 1.0, "answer": "x" * 40}

    def run(items: int) -> tuple[int, int | None]:
        folder = tmp_path / str(items)
        progress = RunProgress.open(folder, "demo", "eval demo", {"model": "m"}, method_settings={"full": {}})
        before = _written_bytes()
        progress.add((0, "full"), row)
        path = progress_path(folder, "demo")
        inode, size = path.stat().st_ino, path.stat().st_size
        for i in range(1, items):
            progress.add((i, "full"), row)
            stat = path.stat()
            assert stat.st_ino == inode and stat.st_size > size  # the same file, grown: appended, not rewritten
            size = stat.st_size
        progress.finish()
        written = None if before is None else _written_bytes() - before
        assert len(read_record(path)["finished"]) == items
        return path.stat().st_size, written

    small, large = run(10), run(1000)
    line = len(json.dumps({"key": [999, "full"], "row": row}, separators=(",", ":"))) + 1
    assert (large[0] - small[0]) / 990 <= line  # each item costs its own line, whatever came before
    if small[1] is not None:  # the bytes actually written: O(N), where rewriting the record was O(N^2)
        assert large[1] < 2 * large[0] and small[1] < 2 * small[0] + 4096


def test_a_torn_last_line_is_ignored_and_the_item_runs_again(tmp_path, capsys):
    settings = {"model": "m"}
    progress = RunProgress.open(tmp_path, "demo", "eval demo", settings)
    progress.add((1,), {"score": 1})
    progress.add((2,), {"score": 2})
    path = progress_path(tmp_path, "demo")
    whole = path.read_bytes()
    with open(path, "ab") as fh:
        fh.write(b'{"key":[3],"row":{"sco')  # the interrupt landed while this line was being written
    assert len(read_record(path)["finished"]) == 2
    with pytest.raises(ValueError, match="2 finished trials"):
        RunProgress.open(tmp_path, "demo", "eval demo", settings)
    again = RunProgress.open(tmp_path, "demo", "eval demo", settings, resume=True)
    assert again.finished == {(1,): {"score": 1}, (2,): {"score": 2}}
    again.add((3,), {"score": 3})  # the journal is written afresh first: the torn bytes are gone
    assert path.read_bytes().startswith(whole) and b"sco\n" not in path.read_bytes()
    assert [e["key"] for e in read_record(path)["finished"]] == [[1], [2], [3]]
    # a garbled line that is not the last one is damage, not an interruption: refused, with the way out
    path.write_bytes(whole.replace(b'{"key":[1]', b'{"kex":[1]'))
    with pytest.raises(ValueError, match="line 2 .*delete it"):
        RunProgress.open(tmp_path, "demo", "eval demo", settings, resume=True)


def test_an_earlier_lacache_record_still_resumes(tmp_path, capsys):
    settings = {"model": "m", "budget": 0.5}
    legacy = tmp_path / "demo.progress.json"
    legacy.write_text(json.dumps({"format": 1, "command": "eval demo", "complete": False, "settings": settings,
                                  "method_settings": {"full": {"options": {}, "variant": None}},
                                  "finished": [{"key": [100, 0.5, 0, "full"], "row": {"score": 1}}]}, indent=1))
    with pytest.raises(ValueError, match="unfinished run .*demo.progress.json.*--resume"):
        RunProgress.open(tmp_path, "demo", "eval demo", settings)
    with pytest.raises(ValueError, match="budget: recorded 0.5, now 0.25"):
        RunProgress.open(tmp_path, "demo", "eval demo", {**settings, "budget": 0.25}, resume=True)
    again = RunProgress.open(tmp_path, "demo", "eval demo", settings, resume=True)
    assert again.finished == {(100, 0.5, 0, "full"): {"score": 1}}
    assert "1 finished trial recorded in" in capsys.readouterr().err
    again.add((100, 0.5, 0, "lacache"), {"score": 0})
    assert not legacy.exists()  # the journal now holds what the record kept
    again.finish()
    record = read_record(progress_path(tmp_path, "demo"))
    assert record["complete"] and [e["key"][-1] for e in record["finished"]] == ["full", "lacache"]
    assert record["method_settings"] == {"full": {"options": {}, "variant": None}}
