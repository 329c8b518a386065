"""The command line before 'ppml-serve init': one clear line that says to run it, no
traceback; admin actions leave an audit line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ppml_serve.models import demo_model_path

COMMANDS = [
    ["keys", "add-api-key", "--name", "x"],
    ["keys", "list"],
    ["keys", "rotate"],
    ["model", "encrypt", str(demo_model_path()), "out.enc"],
    ["worker", "--model", f"demo={demo_model_path()}"],
    ["keybroker"],
    ["gateway"],
]


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(argv[:2]) for argv in COMMANDS])
def test_commands_without_a_state_dir_say_to_run_init(argv: list[str], tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "ppml_serve", *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "ppml-serve init" in done.stderr, done.stderr


def test_key_administration_is_audited(tmp_path: Path) -> None:
    run = [sys.executable, "-m", "ppml_serve"]
    state = str(tmp_path / "state")
    subprocess.run([*run, "init", "--state-dir", state], check=True, capture_output=True,
                   timeout=60)
    added = subprocess.run([*run, "keys", "add-api-key", "--name", "carol", "--state-dir",
                            state], capture_output=True, text=True, timeout=60)
    revoked = subprocess.run([*run, "keys", "revoke", "carol", "--state-dir", state],
                             capture_output=True, text=True, timeout=60)
    assert "ppml_serve.audit: API key added: name='carol'" in added.stderr
    assert "ppml_serve.audit: API key revoked: name='carol'" in revoked.stderr
    assert added.stdout.strip() not in added.stderr + revoked.stderr, "the key was logged"
