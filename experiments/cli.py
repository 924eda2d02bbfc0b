"""What every binary shares: user-facing errors as one line and an exit code, and clean stops."""

from __future__ import annotations

import logging as pylogging
import signal
import sys
import traceback
from collections.abc import Callable

from absl import flags, logging

from tffpipe import training_loop

# User input errors, not bugs: every tffpipe input error (flags, configs, data files,
# model builders, accounting, output and checkpoint directories) is a ValueError
# subclass. One line, no traceback (unless --verbosity >= 0), exit 2.
USER_ERRORS = (ValueError,)


def run_guarded(main: Callable[[], int | None]) -> int:
    """Runs `main`, turning user errors into `error: ...` on stderr and a non-zero exit."""
    if not flags.FLAGS["verbosity"].present:
        # Quiet by default (warnings and errors); --verbosity=0 shows absl and TF info logs.
        logging.set_verbosity(logging.WARNING)
        tf_logger = pylogging.getLogger("tensorflow")
        tf_logger.setLevel(pylogging.WARNING)
    try:
        return main() or 0
    except training_loop.NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except USER_ERRORS as e:
        if flags.FLAGS["verbosity"].present and flags.FLAGS.verbosity >= 0:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2


class StopSignals:
    """SIGINT/SIGTERM ask the run to stop after the current round (and save); a second one aborts."""

    def __init__(self):
        self.received: int | None = None
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        print(
            f"\n{signal.Signals(signum).name} received: stopping after this round, saving a checkpoint "
            "(send again to abort without saving).",
            file=sys.stderr,
            flush=True,
        )

    def __call__(self) -> bool:
        return self.received is not None

    @property
    def exit_code(self) -> int:
        return 128 + self.received if self.received else 0
