"""Locate the project's shared data (real model weights and texts) for tests.

The folder is ``$LLMINT8_DATA`` if set, else ``../shared/data`` relative to the repository root.
Tests needing a file call :func:`require`, which skips with a clear reason when it is absent.
"""

from __future__ import annotations

import os

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def data_dir() -> str | None:
    """The shared data folder, or None when there is none."""
    env = os.environ.get("LLMINT8_DATA")
    if env:
        return env if os.path.isdir(env) else None
    cand = os.path.normpath(os.path.join(REPO_ROOT, "..", "shared", "data"))
    return cand if os.path.isdir(cand) else None


def data_path(*parts: str) -> str | None:
    """Path of ``parts`` inside the shared data folder if that file exists, else None."""
    d = data_dir()
    if d is None:
        return None
    p = os.path.join(d, *parts)
    return p if os.path.exists(p) else None


def require(*parts: str) -> str:
    """Like :func:`data_path` but skips the calling test when the file is missing."""
    p = data_path(*parts)
    if p is None:
        where = os.environ.get("LLMINT8_DATA") or os.path.join("..", "shared", "data")
        pytest.skip(f"shared data file {'/'.join(parts)} not found (looked in {where}; set LLMINT8_DATA)")
    return p


STORIES_BIN = ("models", "stories260K", "stories260K.bin")
STORIES_TOK = ("models", "stories260K", "tok512.bin")
WIKITEXT_TEST = ("text", "wikitext2_test.txt")
SHAKESPEARE = ("text", "tinyshakespeare.txt")
