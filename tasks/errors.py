"""User errors: a config or data mistake ends the command with its one-line message, not a traceback.

Plain Python (no Lightning, no torch): ``train.py`` wraps the config's resolution in it before the
training stack is imported.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager


# Errors that mean "the config or the data is wrong", each raised with a message that says what
# to change: the command line shows that message, not a stack trace (ZOO_DEBUG=1 shows it).
USER_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError)


def user_error_types() -> tuple[type, ...]:
    """:data:`USER_ERRORS` and the library's own (weights unavailable, model-zoo errors). Each is looked up
    only in the module that defines it, once imported: an error raised before that cannot be one of them.
    (Not ``hasattr(zoo, "hub")``: on zoo's lazy ``__init__`` that imports zoo.hub, and torch with it, and
    ``zoo`` is imported early, by the run-folder check's ``zoo.errnos``.)"""
    where = (("zoo.backbones.weights", "WeightsUnavailableError"), ("zoo.hub.registry", "HubError"))
    found = (getattr(sys.modules.get(module), name, None) for module, name in where)
    return USER_ERRORS + tuple(t for t in found if t is not None)


def _wrappers() -> tuple[type, ...]:
    """Exceptions that only wrap the real one (Hydra's "Error in call to target ...")."""
    from hydra.errors import HydraException

    return (HydraException,)


def user_error_of(e: BaseException) -> BaseException | None:
    """The user error ``e`` reports: ``e`` itself, or what a wrapper (Hydra) was raised from.

    Only wrappers are looked through: an exception raised *while handling* a user error (a real
    bug in an ``except`` block) is not a user error and must surface with its traceback.
    """
    wrappers, seen, types = _wrappers(), set(), user_error_types()
    while not (isinstance(e, types) or _environment_error(e)):
        nxt = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
        if not isinstance(e, wrappers) or nxt is None or id(nxt) in seen:
            return None
        seen.add(id(e))
        e = nxt
    return e


def _environment_error(e: BaseException) -> bool:
    """A full disk, a quota, ``ulimit -f``, a read-only or forbidden folder (:data:`zoo.errnos.WRITE_ERRNOS`);
    like the library's own errors, looked at only once the library was imported (it writes the files)."""
    io = sys.modules.get("zoo.io")
    return io is not None and io.is_environment_error(e)


def _one_line(e: BaseException) -> str:
    if _environment_error(e):  # the path and why, e.g. "cannot write <path>: no space left on the device"
        return sys.modules["zoo.io"].describe_os_error(e)
    msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    if "Original Traceback" in msg:  # raised in a DataLoader worker: keep the worker's own message
        lines = [ln for ln in msg.splitlines() if ln.strip()]
        msg = lines[-1].split(": ", 1)[-1] if lines else msg
    return msg


@contextmanager
def user_errors():
    try:
        yield
    except Exception as e:
        cause = user_error_of(e)
        if os.environ.get("ZOO_DEBUG") or cause is None:
            raise
        raise SystemExit(f"error: {_one_line(cause)}") from None
