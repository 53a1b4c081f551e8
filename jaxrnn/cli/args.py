"""The one argument-parser base of every ``jaxrnn`` subcommand.

Every subcommand builds a :class:`Parser` and declares its options with the
argument types below, so that every bad argument is rejected *before* any
work starts, as one line on stderr and a non-zero exit (``jaxrnn.cli.main``
turns :class:`UsageError` into that line). Options that name files are
checked here too: an input text that is missing, empty or binary, an output
folder that is an existing file.

Example:
  >>> p = Parser(prog="jaxrnn demo")
  >>> p.add_argument("--steps", type=positive_int, default=300)
  >>> p.parse_args(["--steps", "0"])
  Traceback (most recent call last):
  UsageError: argument --steps: expected a positive integer, got '0'
"""

from __future__ import annotations

import argparse
import math
import os
import sys

__all__ = [
    "Parser",
    "UsageError",
    "finite_float",
    "number",
    "output_dir",
    "parse",
    "positive_float",
    "positive_int",
    "nonnegative_int",
    "rate",
    "ratio",
    "read_text_file",
    "text_file",
]


class UsageError(ValueError):
    """A bad command line: reported as one line on stderr, exit status 2."""


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors raise :class:`UsageError` instead of printing usage and exiting."""

    def error(self, message):
        raise UsageError(message)


def parse(parser: argparse.ArgumentParser, argv=None, prepare=None):
    """Parse (and check) a subcommand's arguments: ``(args, None)``, or ``(None, status)`` after one line on stderr.

    Args:
      parser: the subcommand's :class:`Parser`.
      argv: the arguments (``sys.argv[1:]`` by default).
      prepare: optional ``prepare(args)`` run inside the same error handling
        (checks that need several arguments at once); its result replaces ``args``.

    Returns:
      ``(args, None)`` on success; ``(None, 0)`` after ``--help``; ``(None, 2)``
      after printing ``"<prog>: <message>"`` for a bad command line.

    Example:
      >>> args, status = parse(build_parser(), argv)
      >>> if status is not None:
      ...     return status
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
        return (prepare(args) if prepare is not None else args), None
    except SystemExit as e:  # --help
        return None, int(e.code or 0)
    except ValueError as e:  # UsageError, or a check of prepare
        print(f"{parser.prog}: {e}", file=sys.stderr)
        return None, 2


def number(kind, check, what):
    """An argument type: ``kind(text)`` that must satisfy ``check``; ``what`` describes it in errors."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        if not check(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = number(int, lambda v: v >= 1, "a positive integer")
nonnegative_int = number(int, lambda v: v >= 0, "a non-negative integer")
positive_float = number(float, lambda v: v > 0, "a positive finite number")
finite_float = number(float, lambda v: True, "a finite number")
ratio = number(float, lambda v: 0 < v < 1, "a number in (0, 1)")
rate = number(float, lambda v: 0 <= v < 1, "a rate in [0, 1)")


def output_dir(text):
    """An output folder: it may not exist yet, but may not be an existing file."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"expected a folder, but {text!r} is an existing file")
    parent = os.path.dirname(os.path.abspath(text))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot create folder {text!r}: {parent!r} is not writable")
    return text


def read_text_file(path, name="--text"):
    """Read a UTF-8 text file; a missing, empty, binary or undecodable file raises :class:`UsageError`."""
    if not os.path.isfile(path):
        raise UsageError(f"{name}: no such file {path!r}")
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.strip():
        raise UsageError(f"{name}: file {path!r} is empty")
    if b"\x00" in raw:
        raise UsageError(f"{name}: file {path!r} is binary, expected UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{name}: file {path!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def text_file(text):
    """An argument type for an input text file (checked with :func:`read_text_file`; the path is returned)."""
    try:
        read_text_file(text, name="file")
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("file: ")) from None
    return text
