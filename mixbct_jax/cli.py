"""One-line errors for every command line: ``error: <what, where, the fix>`` and exit code 2.

Every CLI's ``__main__`` calls ``run(main)``. An exception a user can cause (a bad flag value, a missing or
damaged file, a config that does not fit the data, a full disk) is printed as one line; anything else is a bug
and keeps its traceback. ``--verbose`` (anywhere on the command line) shows the traceback in every case.
"""

from __future__ import annotations

import os
import pickle
import sys
from collections.abc import Callable, Sequence
from typing import Any

USAGE_EXIT = 2


class UserError(Exception):
    """An error in the command's inputs; its message is the whole story (names the file or field and the fix)."""


# ValueError is how the package reports a bad value throughout; OSError covers missing files, directories where
# a file is expected, permissions and a full disk; the pickle/EOF errors come from damaged .bin files.
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError,
    ValueError,
    OSError,
    KeyError,
    pickle.UnpicklingError,
    EOFError,
)


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (KeyError's quotes dropped, inner newlines folded)."""
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    text = " ".join(str(text).split())
    if isinstance(err, OSError) and not isinstance(err, UserError) and err.filename and str(err.filename) not in text:
        text = f"{err.filename}: {text}"
    return text or type(err).__name__


def user_error_type(err: BaseException) -> bool:
    return isinstance(err, USER_ERRORS)


def snake_case_flags(argv: Sequence[str]) -> list[str]:
    """``--batch-size 8`` -> ``--batch_size 8``: hyphenated flags become snake_case.

    Every command line takes snake_case flags (the style of ``--config.data.global_batch``); the hyphenated
    spelling of earlier releases keeps working.
    """
    out = []
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2 and not arg.startswith("--config."):
            name, eq, value = arg.partition("=")
            arg = "--" + name[2:].replace("-", "_") + eq + value
        out.append(arg)
    return out


def run(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> None:
    """Runs ``main(argv)`` (argv defaults to ``sys.argv[1:]``) and turns user errors into ``error: ...``, exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TensorFlow's import-time INFO lines would bury the error
    verbose = "--verbose" in argv
    argv = [a for a in argv if a != "--verbose"]
    try:
        main(argv)
    except USER_ERRORS as err:
        if verbose:
            raise
        print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
        sys.exit(USAGE_EXIT)
    except SystemExit as exit_:
        if not isinstance(exit_.code, str):  # argparse usage errors (code 2) and plain exits pass through
            raise
        if verbose:
            raise
        print(f"error: {' '.join(exit_.code.split())}", file=sys.stderr, flush=True)
        sys.exit(USAGE_EXIT)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)


def parse_absl_flags(prog: str, argv: Sequence[str]) -> None:
    """Parses ``argv`` into absl's ``FLAGS``.

    A bad value or an override of a config field that does not exist is one ``UserError`` line (absl's
    ``app.run`` would print a multi-line report).
    """
    import re

    from absl import flags

    try:
        flags.FLAGS([prog, *argv])
    except flags.Error as e:
        lines = [s.strip() for s in str(e).splitlines() if s.strip()]
        raise UserError(lines[-1] if len(lines) > 1 else str(e)) from None
    except AttributeError as e:  # ml_collections: an override of a field that does not exist
        key = (re.findall(r"\w+", str(e)) or ["?"])[0]
        flag = next(
            (x.split("=", 1)[0] for x in argv if x.startswith("--config.") and x.split("=", 1)[0].endswith(f".{key}")),
            f"--config...{key}",
        )
        hint = re.search(r'Did you mean "[^"]+"', str(e))
        raise UserError(
            f"{flag}: {key!r} is not a config field"
            + (f"; {hint.group(0)}?" if hint else "")
            + " (the fields are listed in mixbct_jax/config.py)"
        ) from None
