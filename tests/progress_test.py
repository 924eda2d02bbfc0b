import io

from tffpipe import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_file_gets_whole_lines_at_most_every_tenth():
    out = io.StringIO()
    counter = progress.Progress(out).counter("data", "clients")
    for done in range(0, 101):
        counter(done, 100)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and 10 <= len(lines) <= 12
    assert lines[-1].startswith("data: [########################] 100/100 clients")


def test_a_terminal_gets_one_redrawn_line():
    out = Terminal()
    counter = progress.Progress(out).counter("data", "clients")
    counter(1, 4)
    counter(4, 4)
    assert out.getvalue().count("\n") == 1 and out.getvalue().count("\r") == 2


def test_a_phase_names_itself_and_reports_its_time_only_when_slow():
    out = io.StringIO()
    with progress.Progress(out).phase("loading"):
        pass
    slow = io.StringIO()
    with progress.Progress(slow, quiet_seconds=0.0).phase("building"):
        pass
    assert out.getvalue() == "loading ...\n"
    assert slow.getvalue().startswith("building ...\nbuilding: 0.0 s")
    terminal = Terminal()
    with progress.Progress(terminal).phase("loading"):
        pass
    assert terminal.getvalue() == "loading ...\r\r\033[K"  # a quick phase leaves no line on a terminal


def test_disabled_progress_prints_nothing():
    off = io.StringIO()
    reporter = progress.Progress(off, enabled=False)
    reporter.counter("data", "clients")(1, 1)
    with reporter.phase("loading"):
        pass
    assert off.getvalue() == ""
