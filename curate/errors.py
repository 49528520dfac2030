"""The one base of every error a user can fix: a job file, an input, a model, a device, an output
folder, a policy. The CLI prints such an error as one line and exits 2; anything else is a bug
and exits 1 with the traceback in a log file. No imports: every module can use it."""
from __future__ import annotations


class CurateError(Exception):
    """A problem the user can fix; the message is one line that names it."""
