"""Settings from defaults, YAML, environment and overrides, with readable errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from ppml_serve.errors import ConfigError
from ppml_serve.settings import load_settings


def test_yaml_then_environment_then_overrides(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "ppml.yaml"
    config.write_text("worker:\n  max_batch_size: 8\n  max_batch_delay_ms: 4\n"
                      "gateway:\n  port: 9000\n")
    monkeypatch.setenv("PPML_WORKER__MAX_BATCH_SIZE", "32")
    settings = load_settings(config, gateway={"port": 9443})
    assert settings.worker.max_batch_size == 32
    assert settings.worker.max_batch_delay_ms == 4
    assert settings.gateway.port == 9443


def test_bad_value_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PPML_WORKER__MAX_BATCH_SIZE", "0")
    with pytest.raises(ConfigError, match=r"worker\.max_batch_size: .*greater than or equal to 1"):
        load_settings()


def test_unknown_setting_in_yaml(tmp_path: Path) -> None:
    config = tmp_path / "ppml.yaml"
    config.write_text("worker:\n  max_batch: 8\n")
    with pytest.raises(ConfigError, match=r"worker\.max_batch: unknown setting"):
        load_settings(config)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--config: no such file"):
        load_settings(tmp_path / "absent.yaml")


def test_invalid_yaml(tmp_path: Path) -> None:
    config = tmp_path / "ppml.yaml"
    config.write_text("worker: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(config)


def test_bad_model_name() -> None:
    with pytest.raises(ConfigError, match=r"models: .*model name"):
        load_settings(models={"bad name!": "x.onnx"})


def test_redis_url_secret_never_in_repr_and_plaintext_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PPML_REDIS__URL", "rediss://ppml:hunter2-secret@10.0.0.1:6380/0")
    settings = load_settings()
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings.model_dump())
    assert settings.redis_url().get_secret_value().endswith("6380/0")
    monkeypatch.setenv("PPML_REDIS__URL", "redis://ppml:pw@127.0.0.1:6379/0")
    with pytest.raises(ConfigError, match="plaintext redis:// refused") as caught:
        load_settings().redis_url()
    assert "pw@" not in str(caught.value)


def test_missing_redis_url_file_is_explained(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"redis\.url_file: cannot read"):
        load_settings(state_dir=tmp_path).redis_url()


def test_cli_refuses_a_redis_password_on_the_command_line() -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "ppml_serve", "gateway", "--redis-url",
         "rediss://ppml:hunter2@10.0.0.5:6380/0"], capture_output=True, text=True, timeout=60,
        check=False)
    assert done.returncode == 2
    assert "refusing a password on the command line" in done.stderr
    assert "hunter2" not in done.stderr


def test_the_removed_python_request_path_settings_name_the_fix(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # older configurations that chose what every gateway does now still load
    kept = load_settings(state_dir=tmp_path, gateway={"front": "native", "native_infer": True})
    assert not hasattr(kept.gateway, "front") and not hasattr(kept.gateway, "native_infer")
    for gateway in ({"front": "python"}, {"native_infer": False}):
        with pytest.raises(ConfigError, match=r"the Python request path was removed.*delete "
                                              r"the setting"):
            load_settings(state_dir=tmp_path, gateway=gateway)
    monkeypatch.setenv("PPML_GATEWAY__NATIVE_INFER", "false")
    with pytest.raises(ConfigError, match="native_infer can only be true"):
        load_settings(state_dir=tmp_path)
