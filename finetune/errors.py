"""The one base class for bad input: every stage's user-facing error derives from it.

The CLI and the tiers catch UserError (exit code 2, a message naming the file/line/key, no traceback);
anything else is a bug or a machine problem and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user: a config, dataset, template, Modelfile, model folder or adapter."""
