"""Thin absl binaries run as `python -m experiments.<name>`.

Importing this package (which `python -m experiments.x` does first) quiets TF's C++
start-up logs unless the user asked for them, and checks the environment before
anything heavy is imported, so a broken install prints one message and exits 2.
"""

import os
import sys

# TF reads this once, at import: it must be set before TensorFlow is loaded. Binaries
# default absl's --verbosity to -1 (warnings); an explicit --verbosity=0 (info) or
# higher brings back TF's C++ start-up logs as well.
_verbose = any(a.split("=", 1)[0] in ("--verbosity", "-v") and not a.endswith(("=-1", "=-2", "=-3")) for a in sys.argv)
if not _verbose:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

try:
    import tffpipe  # noqa: E402,F401  (importing the library checks the environment)
except RuntimeError as e:
    # The class lives in the half-imported package, so match it by name.
    if type(e).__name__ != "EnvironmentMismatchError":
        raise
    print(e, file=sys.stderr)
    sys.exit(2)
