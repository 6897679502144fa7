"""Whether the process that made something still lives (core/owner.py)."""

import subprocess
import time
from pathlib import Path

from dr_pipelines.core.owner import owner_dead, owner_tag, pid_alive


def test_a_killed_process_its_parent_has_not_reaped_is_dead():
    """A zombie still takes signal 0; what it made must be told as a dead owner's all the same."""
    proc = subprocess.Popen(["sleep", "30"])
    tag = owner_tag(proc.pid)
    assert pid_alive(proc.pid) and owner_dead(tag) is False
    proc.kill()
    stat = Path(f"/proc/{proc.pid}/stat")
    deadline = time.monotonic() + 10
    while stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":  # not reaped: a zombie
        assert time.monotonic() < deadline, "the killed child never became a zombie"
        time.sleep(0.01)
    assert not pid_alive(proc.pid) and owner_dead(tag) is True
    proc.wait()
    assert not pid_alive(proc.pid) and owner_dead(tag) is True
