"""The two kinds of errors a run reports to its user (standard library only).

Bad input (a flag, a file, a builder, a checkpoint of another configuration) is an
`InputError`: the binaries print one `error:` line naming the value and the fix and
exit 2, before anything is written. A `Fault` is something that went wrong while
running (a diverged loss, a full disk, a worker that died): one `error:` line too,
with the exit code the fault carries, and whatever was saved stays usable.

Anything else, a plain `ValueError` from TensorFlow or TFF in the middle of a round
included, is an internal error: the binaries say so, write the traceback to a log
file and exit 1. So only the boundary's own checks may raise `InputError`.
"""


class InputError(ValueError):
    """Bad input, found by a check at the boundary: the message names the value and the fix."""


class Fault(RuntimeError):
    """A run stopped by a fault, not by bad input; what was saved before it is intact."""

    exit_code = 1
