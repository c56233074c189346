"""Checks on the paths users give the command-line tools."""

from __future__ import annotations

import os


def output_file_problem(path: str) -> str | None:
    """Why `path` cannot be written as a file (it is a folder, or lies under a file), or None.

    A missing parent folder is not a problem here (the tools create it or say so themselves).
    """
    if os.path.isdir(path):
        return "is a folder; pass the file to write"
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is a file, not a folder"
    return None
