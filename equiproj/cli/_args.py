"""Argument types of the command line: each turns a bad value into an argparse error (exit status 2,
with the reason) before any work is done."""

from __future__ import annotations

import argparse
import math
import os

__all__ = ["seed", "positive_int", "positive_float", "device", "output_file", "output_dir", "key_list",
           "EXIT_CODES"]

#: what the exit status of ``equiproj bench`` / ``verify`` means (their ``--help`` says it)
EXIT_CODES = ("exit status: 0 every verification passed; 1 a verification failed; 2 bad arguments "
              "(nothing was run)")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def seed(text: str) -> int:
    """A seed of torch's generators: an integer in [0, 2^63)."""
    value = _int(text)
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"{value} is not a seed: give an integer from 0 to 2^63 - 1")
    return value


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} is not a positive finite number")
    return value


def device(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` (whether that GPU exists is checked when the command runs)."""
    kind, _, index = text.partition(":")
    if kind == "cpu" and not index or kind == "cuda" and (not index or index.isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not a device: give cpu, cuda or cuda:N")


def _writable_dir(path: str) -> bool:
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def output_file(suffix: str | None = None):
    """The type of an output file argument: its folder exists and is writable, the path is not a
    folder (nor a file that cannot be overwritten), and it ends in ``suffix`` when one is given."""

    def check(text: str) -> str:
        if suffix and not text.lower().endswith(suffix):
            raise argparse.ArgumentTypeError(f"{text!r} must end in {suffix}")
        folder = os.path.dirname(os.path.abspath(text))
        if not os.path.isdir(folder):
            raise argparse.ArgumentTypeError(f"cannot write {text!r}: the folder {folder} does not exist")
        if not _writable_dir(folder):
            raise argparse.ArgumentTypeError(f"cannot write {text!r}: the folder {folder} is not writable")
        if os.path.isdir(text):
            raise argparse.ArgumentTypeError(f"cannot write {text!r}: it is a folder; give a file name")
        if os.path.exists(text) and not os.access(text, os.W_OK):
            raise argparse.ArgumentTypeError(f"cannot write {text!r}: the file exists and is not writable")
        return text

    return check


def output_dir(text: str) -> str:
    """An output folder: an existing writable folder, or one that can be created (its nearest
    existing parent is a writable folder)."""
    path = os.path.abspath(text)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise argparse.ArgumentTypeError(f"{text!r} exists and is not a folder")
        if not _writable_dir(path):
            raise argparse.ArgumentTypeError(f"the folder {text!r} is not writable")
        return text
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not _writable_dir(parent):
        raise argparse.ArgumentTypeError(f"cannot create {text!r}: {parent} is not a writable folder")
    return text


def key_list(valid):
    """The type of a comma-separated list of keys, each one of ``valid`` (at least one)."""

    def check(text: str) -> tuple[str, ...]:
        keys = tuple(s.strip() for s in text.split(",") if s.strip())
        if not keys:
            raise argparse.ArgumentTypeError(f"no keys given: choose from {','.join(valid)}")
        unknown = [k for k in keys if k not in valid]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {'key' if len(unknown) == 1 else 'keys'} "
                                             f"{','.join(unknown)}: choose from {','.join(valid)}")
        return keys

    return check
