"""Shared plumbing of the ``python -m llmint8`` subcommands: one-line errors and exit codes.

Every subcommand is a function ``main(argv: list[str]) -> int`` wrapped by :func:`run_command`:

- exit 0: success;
- exit 2: a usage error, found before any work starts: an unknown option or value, a number out
  of range, an input file that is missing or not a regular file, an output path that cannot be
  written (raise :class:`UsageError`, or let :class:`ArgumentParser` do it);
- exit 141 and no message: stdout's reader went away (``python -m llmint8 demo | head``), as for
  any Unix tool killed by SIGPIPE;
- exit 1: a failure while running: a model that does not load, a missing optional dependency,
  a computation that raises (raise :class:`CommandError`; any other exception is reported the
  same way, as one line, without a traceback).

Every error is printed as one line on stderr, ``python -m llmint8 NAME: error: MESSAGE``.
``LLMINT8_TRACEBACK=1`` re-raises unexpected exceptions instead, for debugging.

Checks that a subcommand should run before computing anything: :func:`require_module` (an
optional dependency, naming the extra that installs it), :func:`check_input_file`,
:func:`check_output_file` and :func:`check_output_dir`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from typing import Callable, Sequence

__all__ = ["UsageError", "CommandError", "ArgumentParser", "run_command", "broken_pipe_exit", "require_module",
           "check_input_file", "check_output_file", "check_output_dir", "positive_int",
           "add_tokenizer_argument", "check_tokenizer", "read_text_arg", "format_duration", "write_json"]


class CommandError(Exception):
    """A failure of a subcommand: exit code 1, the message printed as one line."""

    exit_code = 1


class UsageError(CommandError):
    """A bad argument, detected before any work: exit code 2."""

    exit_code = 2


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` that raises :class:`UsageError` (one line) instead of printing
    the usage block and calling ``sys.exit(2)``. ``--help`` still prints and exits 0."""

    def error(self, message):  # noqa: D102 - argparse hook
        raise UsageError(message)


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) if str(e) else ""
    if isinstance(e, CommandError):
        return msg or type(e).__name__
    # unexpected exception types: name them, the message alone may not say what failed
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)) and e.filename:
        return f"{e.strerror or type(e).__name__}: {e.filename}"
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def run_command(prog: str, fn: Callable[[list], int], argv: Sequence[str]) -> int:
    """Call ``fn(list(argv))`` and turn every error into one stderr line and an exit code
    (see the module docstring). ``prog`` names the command in the messages."""
    try:
        rc = fn(list(argv))
        sys.stdout.flush()  # a reader that went away shows here, not at interpreter exit
        return 0 if rc is None else int(rc)
    except BrokenPipeError:
        return broken_pipe_exit()
    except SystemExit as e:  # argparse's --help / --version, or a deliberate exit
        code = e.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except CommandError as e:
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return e.exit_code
    except Exception as e:  # noqa: BLE001 - the command line never shows a traceback
        if os.environ.get("LLMINT8_TRACEBACK"):
            raise
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 1


#: The exit code of a command whose output reader went away (``... | head``): that of a
#: process killed by SIGPIPE, as ``seq 1000000 | head`` reports under ``set -o pipefail``.
BROKEN_PIPE_EXIT = 128 + 13


def broken_pipe_exit() -> int:
    """Quiet end of a command whose stdout reader has gone: no message (the user closed
    the pipe on purpose), stdout pointed at /dev/null so that Python's flush at exit does
    not fail again; returns :data:`BROKEN_PIPE_EXIT`."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout replaced by an object without a descriptor
        pass
    return BROKEN_PIPE_EXIT


def require_module(module: str, extra: str, purpose: str) -> None:
    """Raise :class:`CommandError` naming the extra to install when ``module`` cannot be imported;
    call it before starting work that will need the module."""
    try:
        missing = sys.modules[module] is None if module in sys.modules else importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        missing = True
    if missing:
        raise CommandError(f"{purpose} needs the Python package {module!r}, which is not installed; "
                           f"install it with: pip install 'llmint8[{extra}]'")


def check_input_file(path: str, what: str = "input file") -> str:
    """Return ``path`` if it names a readable regular file; else raise :class:`UsageError`
    saying what is wrong (missing, a folder, a device such as /dev/null, unreadable)."""
    if not os.path.exists(path):
        raise UsageError(f"{what} {path!r} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"{what} {path!r} is a folder; expected a file")
    if not os.path.isfile(path):
        raise UsageError(f"{what} {path!r} is not a regular file (a device, pipe or socket); expected a text file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{what} {path!r} is not readable")
    return path


def _writable_parent(path: str, what: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{what} {path!r}: folder {parent!r} does not exist")


def _why(e: OSError) -> str:
    return e.strerror or type(e).__name__


def _probe_file(path: str, what: str) -> None:
    """Open ``path`` for writing the way the command will, without changing it: an existing
    regular file is opened for appending (nothing written), a new one is created and removed.
    ``os.access`` alone is not enough: it says yes to root everywhere, and knows nothing of
    read-only or pseudo file systems (/proc, /sys) that refuse the file later."""
    if os.path.exists(path):
        if not os.path.isfile(path):
            # a device or pipe (/dev/null, /dev/stdout): opening a pipe could block, so ask only
            if not os.access(path, os.W_OK):
                raise UsageError(f"{what} {path!r} exists and is not writable")
            return
        try:
            with open(path, "ab"):
                pass
        except OSError as e:
            raise UsageError(f"{what} {path!r} exists and cannot be written: {_why(e)}") from None
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as e:
        raise UsageError(f"{what} {path!r} cannot be written: {_why(e)}") from None
    os.close(fd)
    try:
        os.unlink(path)
    except OSError:  # pragma: no cover - created a moment ago in a writable folder
        pass


def check_output_file(path: str, what: str = "output file") -> str:
    """Return ``path`` if a file can be written there (its folder exists and is writable; an
    existing file is replaced, a folder is refused); else raise :class:`UsageError`. The check
    opens the file for writing (see :func:`_probe_file`) and leaves no trace."""
    if os.path.isdir(path):
        raise UsageError(f"{what} {path!r} is a folder; expected a file name")
    _writable_parent(path, what)
    _probe_file(path, what)
    return path


def check_output_dir(path: str, what: str = "output folder", files: Sequence[str] = ()) -> str:
    """Return ``path`` if it is a writable folder or one that can be created, and each of
    ``files`` (names inside it that the command will write) can be written; else raise
    :class:`UsageError` (an existing file of that name, a folder that cannot be created or
    written, one of ``files`` that is a folder or read-only). The check creates the missing
    folders and a file inside, and removes what it created."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{what} {path!r} exists and is not a folder")
    created = []
    if not os.path.exists(path):
        # the nearest existing ancestor must be a folder
        missing, parent = [], os.path.abspath(path)
        while not os.path.exists(parent):
            missing.append(parent)
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise UsageError(f"{what} {path!r}: {parent!r} is a file, not a folder")
        for d in reversed(missing):
            try:
                os.mkdir(d)
            except FileExistsError:
                continue
            except OSError as e:
                _remove_dirs(created)
                raise UsageError(f"{what} {path!r} cannot be created: {_why(e)} ({d!r})") from None
            created.append(d)
    try:
        try:
            fd, probe = tempfile.mkstemp(dir=path, prefix=".llmint8-write-test-")
        except OSError as e:
            raise UsageError(f"{what} {path!r} is not writable: {_why(e)}") from None
        os.close(fd)
        os.unlink(probe)
        for name in files:
            f = os.path.join(path, name)
            if os.path.isdir(f):
                raise UsageError(f"{what} {path!r}: {name!r} there is a folder; the command writes a file of that name")
            _probe_file(f, what)
    finally:
        _remove_dirs(created)
    return path


def write_json(path, obj) -> None:
    """obj as indented JSON in the file path (a --json option, a report); an OSError becomes a
    CommandError naming the file."""
    try:
        with open(path, "w") as f:
            json.dump(obj, f, indent=2)
    except OSError as e:
        raise CommandError(f"cannot write {os.fspath(path)!r}: {e.strerror or e}") from None


def add_tokenizer_argument(p: argparse.ArgumentParser) -> None:
    """The ``--tokenizer PATH`` option of the commands that load a model (passed to
    :func:`llmint8.models.load_model`, which it hands to ``load_tokenizer``)."""
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="tokenizer to use instead of the one found beside the model: a llama2.c "
                        "tokenizer .bin, a tokenizer.json, a Hugging Face tokenizer folder or a .gguf file")


def check_tokenizer(path: str | None) -> str | None:
    """``--tokenizer``'s value checked before any work: an existing file or folder."""
    if path is not None and not os.path.exists(path):
        raise UsageError(f"--tokenizer {path!r} does not exist")
    return path


def read_text_arg(path: str, what: str, max_chars: int | None = None) -> str:
    """The UTF-8 text of an input file option (``--text``, ``--calibration-text``), read with
    :func:`llmint8.models.perplexity.read_text`: a binary or non-UTF-8 file is a
    :class:`UsageError` naming it, never scored as replacement characters."""
    from .models.perplexity import read_text

    check_input_file(path, what)
    try:
        return read_text(path, max_chars)
    except (OSError, ValueError) as e:
        raise UsageError(f"{what}: {e}") from None


def _remove_dirs(created: list) -> None:
    for d in reversed(created):
        try:
            os.rmdir(d)
        except OSError:  # pragma: no cover - someone else wrote into it meanwhile: keep it
            break


def format_duration(seconds: float) -> str:
    """A time estimate or measurement for people: "42 s", "3.5 min", "2.1 h"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def positive_int(s: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v
