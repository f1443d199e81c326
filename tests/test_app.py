"""The binaries' shared runner: how user mistakes and a closed stdout end a command."""

import os
import subprocess
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(body: str) -> subprocess.CompletedProcess:
  script = ("from modit_jax import errors\n"
            "from modit_jax.cli import app\n"
            f"def main(argv):\n  {body}\n"
            "app.run(main)\n")
  return subprocess.run([sys.executable, "-c", script], cwd=_REPO, capture_output=True,
                        text=True, timeout=120)


def test_a_user_error_is_one_line_and_exit_code_2():
  proc = _run("raise errors.UserError('no such thing')")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == "error: no such thing"
  assert "Traceback" not in proc.stderr


def test_a_reader_that_stops_reading_is_no_traceback():
  # What `python -m modit_jax.cli.results_tables ... | head -1` meets once head has exited.
  proc = _run("raise BrokenPipeError(32, 'Broken pipe')")
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr
