"""Temporary output folders of runs that died, removed by the next run that can prove them dead.

A run writes into ``<output>.tmp-<run id>`` and renames it to ``<output>`` at the end
(``pipelines.job``, ``curate.reselect``). A run killed hard (SIGKILL, the OOM killer, a lost
machine) never reaches its own cleanup, so the folder stays, and it used to stay for good. Each
temporary folder now holds ``.owner.json``: the host, the pid and that process's start time. The
next run of the same output removes a leftover only when its owner ran on this host and that
process is gone (a pid reused by a newer process has another start time). What it cannot prove
dead (another host, a folder from before owner files) it leaves alone and names in a warning:
removing the folder of a run still writing would break that run.
"""
from __future__ import annotations

import json
import logging
import os
import socket

from curate import storage

log = logging.getLogger("curate")
OWNER = ".owner.json"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), None where /proc has none."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            stat = fh.read()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the name in parentheses may hold spaces


def alive(pid: int, started: str | None) -> bool:
    """Whether process ``pid`` runs and is the one that started at ``started``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    now = _start_time(pid)
    return started is None or now is None or now == started


def owner() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "started": _start_time(pid)}


def claim(tmp: str) -> None:
    """Mark ``tmp`` as this process's temporary output. A local mark appears whole (written beside,
    then renamed): a run killed while writing it would leave an empty file, which proves nothing,
    and its folder would stay (seen once in CI, the kill landing in that window). An object store
    shows an object only once it is written."""
    storage.makedirs(tmp)
    path = storage.join(tmp, OWNER)
    part = path if storage.is_remote(tmp) else path + ".part"
    with storage.open_file(part, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(owner()) + "\n")
    if part != path:
        os.replace(part, path)


def release(tmp: str) -> None:
    """Drop the mark before ``tmp`` is published as the output."""
    path = storage.join(tmp, OWNER)
    if storage.exists(path):
        storage.remove(path)


def _parent(out: str) -> str:
    return out.rsplit("/", 1)[0] if storage.is_remote(out) else os.path.dirname(out)


def state(folder: str, here: str | None = None) -> str:
    """``dead`` (its owner ran here and is gone), ``running`` (its owner runs here) or ``unknown``."""
    try:
        with storage.open_file(storage.join(folder, OWNER), "r", encoding="utf-8") as fh:
            who = json.load(fh)
        host, pid, started = who["host"], int(who["pid"]), who.get("started")
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown"
    if host != (here or socket.gethostname()):
        return "unknown"
    return "running" if alive(pid, started) else "dead"


def remove_dead(out: str) -> list[str]:
    """Remove the ``<out>.tmp-*`` folders whose owner is provably dead; returns their names."""
    prefix = os.path.basename(out.rstrip("/")) + ".tmp-"
    parent, here = _parent(out), socket.gethostname()
    found = {name: state(storage.join(parent, name), here)
             for name in storage.listdir(parent) if name.startswith(prefix)}
    removed = [name for name, s in found.items() if s == "dead"]
    for name in removed:
        storage.rmtree(storage.join(parent, name))
    if removed:
        log.info("removed %d leftover temporary folder(s) of killed runs: %s", len(removed), ", ".join(removed))
    unknown = [name for name, s in found.items() if s == "unknown"]
    if unknown:
        log.warning("left %d temporary folder(s) beside the output that curate cannot prove dead (another host, "
                    "or no owner file): %s; remove them by hand once no run writes there", len(unknown),
                    ", ".join(unknown))
    return removed
