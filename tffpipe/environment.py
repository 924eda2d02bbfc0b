"""Start-up check that the interpreter and the pinned stack are the ones tffpipe needs.

TFF is fragile about versions: a wrong TF or TFF usually fails deep inside an import
with a traceback that names neither. This module runs before any of them is imported
(stdlib only) and turns a mismatch into one message: what was found, what is needed,
and the command that fixes it.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from collections.abc import Callable, Mapping, Sequence

# Exact versions that are known to work together (see requirements.lock and README).
REQUIRED_PACKAGES: Mapping[str, str] = {
    "tensorflow": "2.14.1",
    "tensorflow-federated": "0.87.0",
    "tensorflow-privacy": "0.9.0",
    "dp-accounting": "0.4.3",
    "keras": "2.14.0",
    "numpy": "1.25.2",
    "absl-py": None,
    "Hershey-Fonts": None,
    "symspellpy": None,
}
SUPPORTED_PYTHON = ((3, 9), (3, 11))
FIX_COMMAND = "make env   (or: pip install --no-deps -r requirements.lock && pip install --no-deps -e .)"
SKIP_VARIABLE = "TFFPIPE_SKIP_ENV_CHECK"


class EnvironmentMismatchError(RuntimeError):
    """The running interpreter or installed packages are not the ones tffpipe needs."""


def _installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def find_problems(
    python_version: Sequence[int],
    installed_version: Callable[[str], str | None] = _installed_version,
    required: Mapping[str, str | None] = REQUIRED_PACKAGES,
) -> list[str]:
    """Returns one line per mismatch between the environment and what tffpipe needs."""
    problems = []
    low, high = SUPPORTED_PYTHON
    found = tuple(python_version[:2])
    if not low <= found <= high:
        problems.append(
            f"Python {'.'.join(map(str, python_version[:3]))} found; tffpipe needs Python "
            f"{low[0]}.{low[1]}-{high[0]}.{high[1]} (TensorFlow Federated 0.87 has no wheels for newer)."
        )
    for name, wanted in required.items():
        have = installed_version(name)
        if have is None:
            problems.append(f"{name} is not installed; tffpipe needs {name}{'==' + wanted if wanted else ''}.")
        elif wanted is not None and have != wanted:
            problems.append(f"{name} {have} found; tffpipe needs {name}=={wanted}.")
    return problems


def format_problems(problems: Sequence[str]) -> str:
    lines = ["tffpipe cannot start in this environment:"]
    lines += [f"  - {p}" for p in problems]
    lines += [
        f"Fix: {FIX_COMMAND}",
        f"(Set {SKIP_VARIABLE}=1 to start anyway at your own risk.)",
    ]
    return "\n".join(lines)


def problems_unless_skipped() -> list[str]:
    """The problems of this environment, or none when SKIP_VARIABLE=1."""
    if os.environ.get(SKIP_VARIABLE) == "1":
        return []
    return find_problems(sys.version_info)


def check() -> None:
    """Raises EnvironmentMismatchError naming every problem, unless skipped by variable.

    The binaries run this first; a library user may call it before importing the rest.
    """
    problems = problems_unless_skipped()
    if problems:
        raise EnvironmentMismatchError(format_problems(problems))
