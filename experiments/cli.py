"""What every binary shares: the start-up sequence, user errors as one line, clean stops.

Standard library only at import: a binary imports this first and calls
`require_environment()` before absl, numpy or TensorFlow are imported, so a broken
install prints one message instead of an import traceback. `start` then parses the
flags (absl's own parse errors become one `error:` line and exit 2 as well), prints
the binary's flags by group for --help/--helpshort, and runs `main`, mapping what it
raises to one line and an exit code:

  tffpipe.errors.InputError (bad input: flags, files, builders,
    checkpoints; the boundary's checks raise it)               -> 2
  tffpipe.errors.Fault (a fault while running)                 -> its exit_code (1, 3, ...)
  KeyboardInterrupt, processes.Interrupted (a stop asked for)  -> 130 (SIGINT) / 143 (SIGTERM)
  anything else, a plain ValueError from TF or TFF included    -> 1: "internal error: ..." naming
    a log file with the traceback (`internal_error.log` in the experiment directory if it
    exists, else a temporary file)

With --verbosity >= 0 the traceback is printed too.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence

_HELP = ("--help", "-h", "--helpshort", "-?", "--helpfull")


def _verbose(argv: Sequence[str]) -> bool:
    for arg in argv:
        name, _, value = arg.partition("=")
        if name in ("--verbosity", "-v") and value not in ("-1", "-2", "-3"):
            return True
    return False


def require_environment() -> None:
    """Exits 2 with one message when the interpreter or the pinned packages are wrong."""
    from tffpipe import environment  # standard library only

    problems = environment.problems_unless_skipped()
    if problems:
        print(environment.format_problems(problems), file=sys.stderr)
        sys.exit(2)
    if not _verbose(sys.argv):
        # TF reads this once, at import. Level 3 whatever the user's shell exports: at 2 (a
        # common setting) TF still prints "E ... Unable to register cuDNN factory" lines at
        # start-up on every CPU machine, which would bury the one `error:` line. With
        # --verbosity=0 or higher the user's TF_CPP_MIN_LOG_LEVEL (or TF's default, 0) holds.
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"


class StopSignals:
    """SIGINT/SIGTERM ask the run to stop after the current step (and save); a second one aborts."""

    last: int | None = None  # the first signal any instance received, for the exit code

    def __init__(self):
        self.received: int | None = None
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = StopSignals.last = signum
        print(
            f"\n{signal.Signals(signum).name} received: stopping after this step, saving what is done "
            "(send again to abort at once).",
            file=sys.stderr,
            flush=True,
        )

    def __call__(self) -> bool:
        return self.received is not None

    @property
    def exit_code(self) -> int:
        return 128 + self.received if self.received else 0


def start(main: Callable[[], int | None], *, doc: str, own_flags: Sequence[str] = ()) -> None:
    """Parses flags, runs `main` and exits with its code; see the module doc for errors."""
    from absl import flags, logging

    from experiments import flag_groups
    from tffpipe import context_guard

    context_guard.refuse_once_imported()  # TFF's default context would start a worker listening on every address

    program = os.path.basename(sys.argv[0]).removesuffix(".py")
    if any(arg in _HELP for arg in sys.argv[1:]):
        try:
            full = "--helpfull" in sys.argv[1:]
            print(flag_groups.help_text(f"experiments.{program}", doc, own_flags, full=full), flush=True)
        except BrokenPipeError:  # `--helpshort | head`
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    problem = flagfile_problem(sys.argv)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    try:
        rest = flags.FLAGS(sys.argv)
    except flags.Error as e:
        print(f"error: {e} (--helpshort lists the flags)", file=sys.stderr)
        sys.exit(2)
    if len(rest) > 1:
        print(f"error: unexpected arguments {rest[1:]}; flags take the form --name=value", file=sys.stderr)
        sys.exit(2)
    verbose = flags.FLAGS["verbosity"].present and flags.FLAGS.verbosity >= 0
    if not verbose:
        import logging as pylogging

        logging.set_verbosity(logging.WARNING)
        pylogging.getLogger("tensorflow").setLevel(pylogging.WARNING)
    sys.exit(run_guarded(main, verbose=verbose))


def run_guarded(
    main: Callable[[], int | None], *, verbose: bool = False, log_dir: Callable[[], str | None] | None = None
) -> int:
    """Runs `main`, turning errors into one line and an exit code (see the module doc).

    Args:
      main: the binary's work.
      verbose: also print the traceback.
      log_dir: where an internal error's traceback goes (None: a temporary file);
        by default the experiment directory of the parsed flags, if it exists.
    """
    from tffpipe import errors, processes

    try:
        return main() or 0
    except BrokenPipeError:  # `... | head`: the reader is gone, which is not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (KeyboardInterrupt, processes.Interrupted):
        print("\ninterrupted: stopped before anything partial was kept; rerun to continue.", file=sys.stderr)
        return 128 + (StopSignals.last or signal.SIGINT)
    except errors.Fault as e:
        if verbose:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except errors.InputError as e:
        if verbose:
            traceback.print_exc()
        from experiments import flag_groups

        print(f"error: {_one_line(flag_groups.to_flag_error(e))}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001  (anything else is a bug, ours or a library's, not the user's input)
        if verbose:
            traceback.print_exc()
        path = _save_traceback((log_dir or _experiment_dir)())
        first = (str(e).strip().splitlines() or [""])[0][:300]
        print(
            f"internal error: {type(e).__name__}: {first} -- a bug in tffpipe or a library it uses, not a problem "
            f"with your input; the traceback is in {path}",
            file=sys.stderr,
        )
        return 1


def _experiment_dir() -> str | None:
    """<root_dir>/<experiment> of the parsed flags, if the binary has them and the directory exists."""
    from absl import flags

    values = flags.FLAGS
    if not values.is_parsed() or "root_dir" not in values or "experiment" not in values:
        return None
    path = os.path.join(values.root_dir, values.experiment)
    return path if os.path.isdir(path) else None


def _save_traceback(directory: str | None) -> str:
    """Appends the current exception's traceback to <directory>/internal_error.log (or a temporary file)."""
    import tempfile
    import time

    text = f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} {' '.join(sys.argv)}\n{traceback.format_exc()}\n"
    if directory is not None:
        path = os.path.join(directory, "internal_error.log")
        try:
            with open(path, "a") as f:
                f.write(text)
            return path
        except OSError:
            pass  # a full disk or a read-only directory: the temporary file below
    fd, path = tempfile.mkstemp(prefix="tffpipe-internal-error-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


_FLAGFILE = ("--flagfile", "-flagfile")


def flagfile_problem(argv: Sequence[str]) -> str | None:
    """What absl would mishandle in the --flagfile files `argv` names, or None.

    absl reads them itself, but one with non-UTF-8 bytes raised UnicodeDecodeError, and
    one that includes itself was skipped with a warning, so the run went on with the
    defaults (a 3,400-client generation). Both are refused here, naming the file. A
    missing file is left to absl, whose error names it.
    """

    def directives(args: Sequence[str], *, command_line: bool) -> list[str]:
        paths = []
        for i, arg in enumerate(args):
            name, sep, value = arg.strip().partition("=")
            if name in _FLAGFILE and sep:
                paths.append(value.strip())
            elif name in _FLAGFILE and command_line and i + 1 < len(args):  # `--flagfile x`: argv only, as absl
                paths.append(args[i + 1].strip())
        return [os.path.expanduser(p) for p in paths if p]

    def visit(path: str, chain: list[str]) -> str | None:
        real = os.path.realpath(path)
        if real in chain:
            loop = " -> ".join([*chain[chain.index(real) :], real])
            return f"--flagfile={path} includes itself ({loop}); remove the --flagfile line that closes the loop"
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            return None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data[: e.start].count(b"\n") + 1
            return f"--flagfile={path}: line {line} is not UTF-8 text ({e.reason}); save the file as UTF-8"
        lines = [line for line in text.splitlines() if not line.lstrip().startswith(("#", "//"))]
        for nested in directives(lines, command_line=False):
            problem = visit(nested, [*chain, real])
            if problem:
                return problem
        return None

    args = list(argv[1:])
    if "--" in args:
        args = args[: args.index("--")]
    for path in directives(args, command_line=True):
        problem = visit(path, [])
        if problem:
            return problem
    return None
