"""The browser test of the chat page may skip on a laptop without chromium, never in CI (issue 18): run it in a
child pytest with chromium pointed at a missing path, with and without CI=true."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


@pytest.mark.parametrize("ci,outcome", [("true", "2 errors"), ("", "2 skipped")])
def test_missing_chromium_fails_in_ci_and_skips_elsewhere(tmp_path, ci, outcome):
    env = dict(os.environ, CHOICELM_CHROMIUM=str(tmp_path / "no-chromium"), CI=ci)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS / "test_web_chat.py")],
                          capture_output=True, text=True, env=env, cwd=TESTS.parent)
    summary = proc.stdout.strip().splitlines()[-1]
    assert outcome in summary, proc.stdout[-3000:]
    assert (proc.returncode != 0) == (ci == "true")
    if ci:
        assert "CI=true and the browser test cannot run" in proc.stdout
