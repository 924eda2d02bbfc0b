"""TFF's default execution context, replaced by one that refuses to run anything.

Importing tensorflow_federated makes a local C++ context TFF's default (its `__init__`
calls `set_sync_local_cpp_execution_context()`). The worker_binary that context starts
on the first computation call listens on every address (`*:PORT`) and is left running,
orphaned, when the process exits without closing it. tffpipe runs computations only in
the contexts it installs (`runtime.install_local_context`, `runtime.Runtime.start`),
whose workers listen on a Unix socket or the address they are given and die with their
parent. A computation called before one of those is installed is a bug, so it should
fail loudly, naming the fix, instead of opening a port on every interface.

`refuse_once_imported()` arranges that for the whole process: the binaries call it at
start (`experiments.cli.start`) and the test session in `tests/conftest.py`. This
module imports no TensorFlow itself, so a TF-free binary (compute_epsilon) pays nothing
for it; TFF's default is replaced right after TFF's own `__init__` has run.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

_TFF = "tensorflow_federated"
MESSAGE = (
    "a TFF computation was called with no tffpipe execution context installed: install one first "
    "(runtime.install_local_context() or runtime.Runtime.start(); in tests, the tff_context fixture). "
    "TFF's own default context, which tffpipe replaces, would start a worker listening on every address "
    "and leave it running after this process exits"
)
_refused = False


class NoContextError(RuntimeError):
    """A TFF computation was called before tffpipe installed an execution context."""


def refuse() -> None:
    """Makes a context that raises `NoContextError` TFF's default in this thread (imports TFF).

    Only in place of TFF's own default (`replaceable`): a context installed since, such
    as tffpipe's (`runtime.install_local_context`), is left as it is, so a late call (a
    binary's `cli.start` after a library caller installed a context) cannot turn a
    working process into a refusing one.
    """
    from tensorflow_federated.python.core.impl.context_stack import context_base, context_stack_impl

    class _Refusing(context_base.SyncContext):
        refuses = True  # what `replaceable` recognizes (each call defines its own class)

        def invoke(self, comp, arg):
            raise NoContextError(MESSAGE)

    global _refused
    stack = context_stack_impl.context_stack
    if replaceable(stack._stack[0]):  # the default, which is what `set_default_context` replaces
        stack.set_default_context(_Refusing())
        _refused = True


def replaceable(context) -> bool:
    """Whether `context` is one the guard replaces: TFF's own default, its placeholder, or the guard's.

    TFF's own default is the local C++ context its `__init__` installs
    (`set_sync_local_cpp_execution_context`), recognized by its executor factory's
    stack function, defined in TFF's `local_cpp_executor_factory` (the one that starts
    the worker listening on every address; TFF 0.87, pinned). Before that, and in a
    thread that never set one, the default is TFF's `RuntimeErrorContext`, which
    refuses too, though without naming tffpipe's fix. Any other context was installed
    on purpose, and is a real one.
    """
    from tensorflow_federated.python.core.impl.context_stack import runtime_error_context

    if getattr(context, "refuses", False) or isinstance(context, runtime_error_context.RuntimeErrorContext):
        return True
    stack_fn = getattr(getattr(context, "executor_factory", None), "_executor_stack_fn", None)
    return getattr(stack_fn, "__qualname__", "").startswith("local_cpp_executor_factory.")


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds TFF as the other finders would, and calls `refuse` once its `__init__` has run."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TFF:
            return None
        sys.meta_path.remove(self)  # once: the finders below find the real spec
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_refuse(module):
            exec_module(module)
            refuse()

        spec.loader.exec_module = exec_then_refuse
        return spec


def refuse_once_imported() -> None:
    """Calls `refuse` now if TFF is imported, else right after it is (without importing it here).

    A late call, once TFF's default has been replaced by a real context, changes nothing (`refuse`).
    """
    if _TFF in sys.modules:
        refuse()
    elif not armed():
        sys.meta_path.insert(0, _AfterImport())


def armed() -> bool:
    """Whether TFF's default has been replaced, or will be when TFF is imported."""
    return _refused or any(isinstance(finder, _AfterImport) for finder in sys.meta_path)
