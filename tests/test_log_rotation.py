"""Log rotation (log_rotation.py) and the controller's tailer following it (runtime/embedded.py).

A real child process writes to a real file through its fds 1 and 2 and rotates it at a small size;
the test steps it (a batch of lines per step, acknowledged on a pipe) and lets the tailer read
after each step, so the outcome is the same however slow the machine is.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from shoal.log_rotation import rotation_settings
from shoal.runtime.embedded import LogTailer

pytestmark = pytest.mark.timeout(120)

LINE = "x" * 48
# Writes `n` numbered lines (print and logging, as a replica does) when told `n` on stdin, checks the
# size, and acknowledges on the pipe fd it is given.
CHILD = f"""
import logging, os, sys
from shoal.log_rotation import RotatingOutput
logging.basicConfig(level=logging.INFO, format="%(message)s")
out = RotatingOutput(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
out.attach()
ack = os.fdopen(int(sys.argv[4]), "w")
i = 0
for cmd in sys.stdin:
    for _ in range(int(cmd)):
        if i % 2:
            print(f"line {{i}} {LINE}", flush=True)
        else:
            logging.getLogger("t").info("line %d {LINE}", i)
        i += 1
    out.check()
    ack.write("ok\\n")
    ack.flush()
"""


def test_rotates_at_size_keeps_count_and_tailer_follows(tmp_path, capsys):
    path = str(tmp_path / "replica_app_D_x.log")
    open(path, "wb").close()
    r, w = os.pipe()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    log = open(path, "ab")
    child = subprocess.Popen([sys.executable, "-c", CHILD, path, "1000", "2", str(w)], stdin=subprocess.PIPE,
                             stdout=log, stderr=subprocess.STDOUT, env=env, text=True, pass_fds=(w,))
    log.close()
    os.close(w)
    acks = os.fdopen(r)
    steps, per_step = 12, 8  # 8 lines of ~58 bytes a step: at most one rotation between two reads

    async def drive() -> None:
        tailer = LogTailer()
        tailer.follow(path, "(replica)", from_end=False)
        for _ in range(steps):
            child.stdin.write(f"{per_step}\n")
            child.stdin.flush()
            assert acks.readline() == "ok\n", "the child exited"
            tailer.drain(path)
        tailer.close()

    try:
        asyncio.run(drive())
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    echoed = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("(replica) line ")]
    assert echoed == [f"(replica) line {i} {LINE}" for i in range(steps * per_step)]
    files = sorted(os.listdir(tmp_path))
    assert files == ["replica_app_D_x.log", "replica_app_D_x.log.1", "replica_app_D_x.log.2"]
    for name in files:
        assert os.path.getsize(tmp_path / name) < 1000 + per_step * 60
    # Oldest to newest: .2, .1, the live file; together the last lines written, in order.
    kept = []
    for name in (files[2], files[1], files[0]):
        with open(tmp_path / name) as f:
            kept += [int(ln.split()[1]) for ln in f if ln.startswith("line ")]
    assert kept and kept[-1] == steps * per_step - 1 and kept == list(range(kept[0], kept[-1] + 1))


def test_rotation_settings_ray_names_and_bad_values():
    assert rotation_settings({}) == (512 * 1024 * 1024, 5)
    assert rotation_settings({"RAY_ROTATION_MAX_BYTES": "1024", "RAY_ROTATION_BACKUP_COUNT": "1"}) == (1024, 1)
    assert rotation_settings({"SHOAL_LOG_ROTATION_MAX_BYTES": "2048", "RAY_ROTATION_MAX_BYTES": "1024"}) == (2048, 5)
    with pytest.raises(ValueError, match="SHOAL_LOG_ROTATION_BACKUP_COUNT='-1'"):
        rotation_settings({"SHOAL_LOG_ROTATION_BACKUP_COUNT": "-1"})
    with pytest.raises(ValueError, match="RAY_ROTATION_MAX_BYTES='1MB'.*whole number"):
        rotation_settings({"RAY_ROTATION_MAX_BYTES": "1MB"})


def test_echoed_lines_are_written_in_whole_line_pieces_that_a_pipe_takes_atomically():
    """The controller echoes replica output to the terminal the driver prints to: each write must fit
    in one atomic pipe write and end at a line end, so a driver's print never lands inside a line."""
    from shoal.runtime.embedded import PIPE_ATOMIC_BYTES, _whole_line_chunks

    lines = [f"(app/D replica=abc) line {i} " + "x" * 90 + "\n" for i in range(200)] + ["é" * 1500 + "\n"]
    chunks = list(_whole_line_chunks(lines))
    assert "".join(chunks) == "".join(lines)
    assert len(chunks) > 1 and all(c.endswith("\n") for c in chunks)
    assert all(len(c.encode()) <= PIPE_ATOMIC_BYTES for c in chunks)
