"""The errors daskadmm reports to its user, and the one formatter that makes them one line.

Every error the library raises on bad input or a failed resource is a :class:`DaskadmmError`,
whose message is one line that names the key, file, store or cluster at fault and, where there
is one, what to do. The subclasses keep the builtin base they have always had (a
:class:`ConfigError` is still a :class:`ValueError`, a :class:`StoreError` a
:class:`RuntimeError`, ...), so ``except ValueError`` and the like keep working, and each stays
importable from the module that raises it (``daskadmm.config.ConfigError``, ...).

The command-line tools print ``<prog>: error: <one line>`` and exit 2; :func:`one_line` turns
any exception (ours, or one from a library underneath) into that line.
"""

from __future__ import annotations

__all__ = [
    "ClusterError",
    "ConfigError",
    "DaskadmmError",
    "DataError",
    "ReportError",
    "StoreError",
    "TorchMissingError",
    "UsageError",
    "one_line",
]

# Hydra's MissingConfigException appends the whole config search path: a long tail that says
# nothing the first line did not.
_DROPPED_TAIL = "Config search path:"


class DaskadmmError(Exception):
    """Base of every error daskadmm reports to its user; the message is one line."""


class ConfigError(DaskadmmError, ValueError):
    """A configuration value is invalid. The message is one line and names the key."""


class DataError(DaskadmmError, ValueError):
    """A data set cannot be loaded. The message is one line and names the file and the problem."""


class StoreError(DaskadmmError, RuntimeError):
    """The state store cannot be used. The message is one line and names the store."""


class ClusterError(DaskadmmError, RuntimeError):
    """The Dask cluster failed mid-run (the scheduler went away, or workers kept dying). One
    line, names what to do."""


class TorchMissingError(DaskadmmError, ImportError):
    """PyTorch is not installed; the message is one line and says how to install it."""


class UsageError(DaskadmmError):
    """Bad input on the command line (a value, an override, a config): one line, exit code 2."""


class ReportError(DaskadmmError):
    """Bad input to ``daskadmm-report``; the message is one line and names the file or
    directory."""


def one_line(error: BaseException | str, *, with_type: bool = False) -> str:
    """``error``'s message as one line.

    Runs of whitespace become one space and lines are joined: with ``", "`` where a one-word
    line follows a line that does not end in ``:`` or ``.`` (a list printed one item a line,
    such as Hydra's "Available options in 'data':"), else with a space. Hydra's trailing config
    search path is dropped. An exception with an empty message gives its type's name;
    ``with_type`` puts the type's name in front (``OSError: ...``) for errors from below
    daskadmm whose message alone does not say what went wrong.
    """
    text = str(error).split(_DROPPED_TAIL)[0]
    lines = [" ".join(line.split()) for line in text.splitlines()]
    out: list[str] = []
    for line in filter(None, lines):
        if out:
            line = (", " if not out[-1].endswith((":", ".")) and " " not in line else " ") + line
        out.append(line)
    text = "".join(out)
    if isinstance(error, BaseException):
        name = type(error).__name__
        if not text:
            return name
        if with_type:
            return f"{name}: {text}"
    return text
