"""A run killed hard leaves ``<output>.tmp-*``; the next run of that output removes what it can
prove dead and leaves (and names) what it cannot."""
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

from conftest import REPO, ids, run_cli, without_models, write_job

from curate import leftovers

HOLDER = "import sys, time\nfrom curate import leftovers\nleftovers.claim(sys.argv[1])\nprint('ready', flush=True)\ntime.sleep(600)\n"


def _killed_holder(folder):
    """A process that claims ``folder``, then is killed with SIGKILL (it never cleans up)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_only_folders_of_dead_owners_on_this_host_are_removed(tmp_path, caplog):
    out = str(tmp_path / "out")
    proc = _killed_holder(out + ".tmp-killed")
    assert leftovers.state(out + ".tmp-killed") == "running"
    assert leftovers.remove_dead(out) == []  # alive: kept, and no warning for a busy folder
    assert os.path.isdir(out + ".tmp-killed") and "cannot prove" not in caplog.text
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    leftovers.claim(out + ".tmp-mine")  # this process: running
    assert os.listdir(out + ".tmp-mine") == [leftovers.OWNER]  # written whole, then renamed: no part left
    os.makedirs(out + ".tmp-nomark")  # a folder from before owner files
    for name, who in (("elsewhere", {"host": socket.gethostname() + "-other", "pid": 1, "started": None}),
                      ("reused", {**leftovers.owner(), "started": "1"}),  # our pid, another start time
                      ("broken", "{not json")):
        os.makedirs(f"{out}.tmp-{name}")
        with open(f"{out}.tmp-{name}/{leftovers.OWNER}", "w") as fh:
            fh.write(who if isinstance(who, str) else json.dumps(who))
    os.makedirs(str(tmp_path / "other.tmp-x"))  # another output's: not ours to judge
    with caplog.at_level(logging.INFO, logger="curate"):
        removed = leftovers.remove_dead(out)
    assert sorted(removed) == ["out.tmp-killed", "out.tmp-reused"]
    assert sorted(os.listdir(tmp_path)) == ["other.tmp-x", "out.tmp-broken", "out.tmp-elsewhere",
                                            "out.tmp-mine", "out.tmp-nomark"]
    assert "cannot prove dead" in caplog.text and "out.tmp-nomark" in caplog.text
    assert "out.tmp-mine" not in caplog.text.split("cannot prove")[1]


def test_a_run_killed_with_sigkill_leaves_a_folder_the_next_run_removes(job_dir):
    rows = [{"instruction": f"Question {i}: what is {i} plus {i}?", "output": f"{i} plus {i} is {2 * i}."}
            for i in range(3000)]
    (job_dir / "pool.json").write_text(json.dumps(rows))
    job = write_job(job_dir, without_models({"output": "out", "inputs": [{"source": "s", "path": "pool.json"}]}))
    proc = subprocess.Popen([sys.executable, "-m", "curate.cli", "run", job], cwd=job_dir,
                            env={**os.environ, "PYTHONPATH": REPO}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not any(n.startswith("out.tmp-") and os.path.isfile(job_dir / n / leftovers.OWNER)
                  for n in os.listdir(job_dir)):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = [n for n in os.listdir(job_dir) if n.startswith("out.tmp-")]
    assert len(left) == 1 and not os.path.exists(job_dir / "out")
    assert run_cli("run", job) == 0
    assert not [n for n in os.listdir(job_dir) if ".tmp-" in n]
    assert len(ids("out")) > 0 and not os.path.exists(job_dir / "out" / leftovers.OWNER)
    # `curate select` writes through its own temporary folder: no owner file ends up in it
    assert run_cli("select", "out", "--policy", "random", "--rows", "5") == 0
    assert not [n for n in os.listdir(job_dir / "out" / "selections") if ".tmp-" in n or n.startswith(".")]
    assert not os.path.exists(job_dir / "out" / "selections" / "random" / leftovers.OWNER)
