"""Progress is shown alike by every long command: a bar on a terminal, one line per finished group in a
log (stderr not a terminal), nothing under --quiet."""

import io

import pytest

import lacache.lab.progress as progress_module
from lacache.cli.main import main as cli_main
from lacache.lab.progress import Progress, as_progress, progress_mode


class Terminal(io.StringIO):
    """A stream that says it is a terminal, as a console's stderr does."""

    def isatty(self) -> bool:
        return True


class Clock:
    """``time.perf_counter`` for the progress module, advanced by hand."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(progress_module.time, "perf_counter", fake)
    return fake


def _drive(meter: Progress, clock: Clock | None = None) -> None:
    """Two groups of two items, the second item of the second group reused from an earlier run."""
    meter.start(4)
    for group in ("first", "second"):
        meter.working_on(group)
        for item in range(2):
            if group == "second" and item == 1:
                meter.skip()
                continue
            if clock is not None:
                clock.now += 3
            meter.advance()
        meter.group_done(group)
    meter.close()


def test_the_mode_follows_the_stream_and_quiet():
    assert progress_mode(stream=Terminal()) == "bar"
    assert progress_mode(stream=io.StringIO()) == "lines"
    assert progress_mode(quiet=True, stream=Terminal()) == "off"
    closed = io.StringIO()
    closed.close()
    assert progress_mode(stream=closed) == "lines"
    with pytest.raises(ValueError, match="mode='bars' must be one of"):
        Progress("x", mode="bars")


def test_a_terminal_gets_a_bar_and_no_lines():
    stream = Terminal()
    _drive(Progress("passkey", stream=stream))
    shown = stream.getvalue()
    assert "passkey: " in shown and "%|" in shown and "3/3" in shown and "trial/s" in shown  # done, rate
    assert "\r" in shown and "[lacache]" not in shown


def test_a_log_gets_one_line_per_finished_group_with_counts_rate_and_eta(clock):
    stream = io.StringIO()
    _drive(Progress("passkey (budget 0.5)", stream=stream), clock)
    assert stream.getvalue().splitlines() == [
        "[lacache] passkey (budget 0.5) first: 2/4 trials, 3.0 s/trial, ETA 6s",
        # the reused item left the total: 3 items to do, all done
        "[lacache] passkey (budget 0.5) second: 3/3 trials, 3.0 s/trial, took 9s",
    ]
    assert "%|" not in stream.getvalue()


def test_quiet_prints_nothing_at_all():
    stream = Terminal()
    meter = Progress("passkey", quiet=True, stream=stream)
    _drive(meter)
    meter.note("a message")
    meter.group_done("third", note="12 ms/token")
    assert stream.getvalue() == ""


def test_fast_items_read_as_a_rate_and_notes_join_the_line(clock):
    stream = io.StringIO()
    meter = Progress("ppl", unit="tok", units="tok", stream=stream).start(4000)
    clock.now += 2
    meter.advance(1000)
    meter.group_done("lacache budget=128", note="ppl 12.3")
    meter.group_done("nothing ran")  # a group with no new work prints nothing
    assert stream.getvalue() == "[lacache] ppl lacache budget=128: 1000/4000 tok, 500.0 tok/s, ETA 6s; ppl 12.3\n"


def test_notes_go_above_a_bar_and_join_the_line_in_a_log(clock):
    bar, log = Terminal(), io.StringIO()
    for stream in (bar, log):
        meter = Progress("bench cache", unit="configuration", stream=stream).start(2)
        clock.now += 4
        meter.advance()
        meter.group_done("2 layers", note="0.1 ms/token")
        meter.close()
    assert "[lacache] bench cache 2 layers: 0.1 ms/token\n" in bar.getvalue()
    assert log.getvalue() == "[lacache] bench cache 2 layers: 1/2 configurations, 4.0 s/configuration, ETA 4s; " \
                             "0.1 ms/token\n"


def test_library_progress_arguments():
    meter = Progress("x")
    assert as_progress(meter, "y") is meter
    assert as_progress(False, "y") is None and as_progress(None, "y") is None
    made = as_progress(True, "ppl", unit="tok", units="tok")
    assert made.desc == "ppl" and made.units == "tok"


# --- the commands ------------------------------------------------------------------------------------------


def _passkey(model, out, *extra: str) -> list[str]:
    return ["eval", "passkey", "--model", str(model), "--lengths", "100", "--depths", "0,1", "--seeds", "1",
            "--methods", "full,lacache", "--out", str(out), *extra]


def test_eval_passkey_prints_one_line_per_cell_in_a_log_and_nothing_when_quiet(tiny_model_dir, tmp_path, capsys):
    assert cli_main(_passkey(tiny_model_dir, tmp_path / "log")) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[lacache] passkey")]
    assert [line.split(":")[0] for line in lines] == ["[lacache] passkey (budget 0.5) 100 tokens, depth 0",
                                                      "[lacache] passkey (budget 0.5) 100 tokens, depth 1"]
    assert ": 2/4 trials, " in lines[0] and ": 4/4 trials, " in lines[1] and "took" in lines[1]
    assert cli_main(_passkey(tiny_model_dir, tmp_path / "quiet", "--quiet")) == 0
    err = capsys.readouterr().err
    assert "[lacache] passkey" not in err and "%|" not in err


def test_eval_passkey_shows_a_bar_on_a_terminal(tiny_model_dir, tmp_path, capsys, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert cli_main(_passkey(tiny_model_dir, tmp_path)) == 0
    shown = terminal.getvalue()
    assert "passkey (budget 0.5): 100%|" in shown and "4/4" in shown
    assert "[lacache] passkey (budget 0.5) 100 tokens" not in shown  # the bar, not the lines


def test_bench_cache_one_line_per_configuration_and_quiet(tmp_path, capsys):
    argv = ["bench", "cache", "--methods", "lacache,streaming", "--budgets", "16", "--layers", "2", "--kv-heads",
            "1", "--head-dim", "8", "--steps", "8", "--ref-steps", "2", "--warmup", "1", "--device", "cpu"]
    assert cli_main([*argv, "--out", str(tmp_path / "log")]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[lacache] bench cache")]
    assert len(lines) == 2 and "1/2 configurations" in lines[0] and "ms/token over" in lines[0]
    assert cli_main([*argv, "--out", str(tmp_path / "quiet"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_eval_ppl_keeps_no_progress_as_an_alias_of_quiet():
    from lacache.cli.main import build_parser

    parse = build_parser().parse_args
    assert parse(["eval", "ppl", "--no-progress"]).quiet and parse(["eval", "ppl", "--quiet"]).quiet
    assert not parse(["eval", "ppl"]).quiet
    for task in ("passkey", "ruler", "longbench --data x"):
        assert parse(["eval", *task.split(), "--quiet"]).quiet
