"""Files that hold secrets or decide who gets them are refused when someone else could have
written them (as ssh refuses a loose ~/.ssh); repository files cannot lead to them; what a
stack writes is owner-only; what it puts in Redis about models is sealed. These run as root
in CI: another user is uid 65534 ('nobody'), made the owner with chown."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ppml_serve.errors import ConfigError
from ppml_serve.gateway.auth import ApiKeyStore, add_api_key
from ppml_serve.models import demo_model_path
from ppml_serve.private_files import read_protected, secure_directory, write_private
from ppml_serve.repository import Repository

from ..conftest import Stack

NOBODY = 65534

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


def _init(state: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ppml_serve", "init", "--state-dir", str(state)],
                          capture_output=True, text=True, timeout=60, check=False)


@needs_root
def test_a_state_dir_of_another_user_is_refused_not_chmodded(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, NOBODY, NOBODY)
    done = _init(state)
    assert done.returncode != 0
    assert "owned by uid 65534" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (state / "api-key").exists()
    link = tmp_path / "link"
    link.symlink_to(state)
    assert "owned by uid 65534" in _init(link).stderr


def test_a_state_dir_others_can_write_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o777)  # noqa: S103 (the loose directory under test)
    with pytest.raises(ConfigError, match="writable by its group or by others"):
        secure_directory(state)
    os.chmod(state, 0o755)  # noqa: S103
    secure_directory(state)  # only readable by others: tightened, not refused
    assert stat.S_IMODE(state.stat().st_mode) == 0o700


@needs_root
def test_an_api_key_file_swapped_by_another_user_is_refused(tmp_path: Path) -> None:
    keys = tmp_path / "api-keys.json"
    add_api_key(keys, "alice", ["*"], ("infer",))
    assert ApiKeyStore.load(keys) is not None
    swapped = tmp_path / "swapped.json"
    swapped.write_text(keys.read_text())
    os.chown(swapped, NOBODY, NOBODY)
    os.replace(swapped, keys)
    with pytest.raises(ConfigError, match="owned by another user"):
        ApiKeyStore.load(keys)


@needs_root
def test_a_link_planted_by_another_user_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "real"
    write_private(target, b"secret")
    link = tmp_path / "api-key"
    link.symlink_to(target)
    assert read_protected(link) == b"secret"  # a link of the owner's (or root's): followed
    os.lchown(link, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match="symbolic link made by another user"):
        read_protected(link)


def test_a_secret_others_can_read_or_write_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "kms-passphrase"
    write_private(path, b"hunter2")
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="readable by its group or by others"):
        read_protected(path)
    assert read_protected(path, secret=False) == b"hunter2"  # e.g. a policy: not secret
    os.chmod(path, 0o620)
    with pytest.raises(ConfigError, match="writable"):
        read_protected(path, secret=False)


def test_secrets_are_never_written_through_a_planted_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    (tmp_path / "api-key.tmp").symlink_to(victim)
    with pytest.raises(ConfigError, match="symbolic link"):
        write_private(tmp_path / "api-key", b"token")
    assert victim.read_text() == "untouched"


def _model_dir(root: Path, config: str) -> Path:
    directory = root / "digits"
    (directory / "1").mkdir(parents=True)
    shutil.copy(demo_model_path(), directory / "1" / "model.onnx")
    (directory / "config.yaml").write_text(config)
    return directory


def test_labels_linked_outside_the_model_directory_are_refused(tmp_path: Path) -> None:
    secret = tmp_path / "state" / "kms-passphrase"
    secret.parent.mkdir()
    write_private(secret, b"the-kms-passphrase")
    directory = _model_dir(tmp_path / "repo", "labels: labels.txt\n")
    (directory / "labels.txt").symlink_to(secret)
    with pytest.raises(ConfigError, match="leads outside the model's directory") as caught:
        Repository(tmp_path / "repo").entry("digits")
    assert "the-kms-passphrase" not in str(caught.value)
    (directory / "labels.txt").unlink()
    (directory / "names.txt").write_text("zero\none\n")
    (directory / "labels.txt").symlink_to("names.txt")  # inside: fine
    assert Repository(tmp_path / "repo").entry("digits").labels == ("zero", "one")


def test_a_huge_config_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    directory = _model_dir(tmp_path / "repo", "")
    with (directory / "config.yaml").open("w") as handle:
        handle.write("labels: [" + "x, " * (10 << 20) + "]\n")  # 30 MiB of YAML
    with pytest.raises(ConfigError, match="larger than 1024 KiB"):
        Repository(tmp_path / "repo").entry("digits")


def test_every_file_a_stack_writes_is_owner_only(stack: Stack) -> None:
    """Keys, certificates, URLs, logs, Redis's AOF, the spool: 0600 files, 0700 folders."""
    loose = []
    for path in stack.settings.state_dir.rglob("*"):
        mode = path.lstat().st_mode
        if stat.S_ISSOCK(mode):
            continue  # redis.sock: unixsocketperm 700, in a 0700 folder
        expected = 0o700 if stat.S_ISDIR(mode) else 0o600
        if stat.S_IMODE(mode) != expected:
            loose.append(f"{path} {oct(stat.S_IMODE(mode))}")
    assert not loose, loose
    assert any((stack.settings.state_dir / "redis" / "appendonlydir").iterdir())


def test_model_specs_in_redis_are_sealed_and_a_forged_one_is_ignored(stack: Stack) -> None:
    admin = stack.admin()
    sealed = admin.hget("ppml:models", "demo")
    assert sealed is not None and b"inputs" not in sealed and b"image" not in sealed
    forged = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 1]}],
                         "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 1]}]})
    admin.hset("ppml:models", "forged", forged)
    try:
        with stack.http() as http:
            assert http.get("/v2/models/forged").status_code == 404
            assert http.get("/v2/models/demo").status_code == 200
    finally:
        admin.hdel("ppml:models", "forged")
