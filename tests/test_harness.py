"""The test harness itself (conftest.py): a test session leaves nothing in the temp folder."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

from conftest import REPO

_SESSION = '''
import pytest
from conftest import ServerProcess


def test_a_server_that_does_not_start() -> None:
    with pytest.raises(RuntimeError, match="did not start"):
        ServerProcess("--model", "tiny", "--max-batch-size", "1")  # refused at once: a log, no model
'''


def test_a_session_leaves_no_server_logs_or_caches_behind(tmp_path: pathlib.Path) -> None:
    """A pytest session in a subprocess with a temp folder of its own, using conftest's ServerProcess:
    afterwards no `lcmserve-*` file or folder is left there (each server's log was one, issue 20)."""
    temp = tmp_path / "temp"
    temp.mkdir()
    (tmp_path / "test_session.py").write_text(_SESSION)
    env = {**os.environ, "TMPDIR": str(temp), "PYTHONPATH": str(REPO / "tests")}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                           str(tmp_path / "test_session.py")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not [p.name for p in temp.iterdir() if p.name.startswith("lcmserve")], done.stdout
