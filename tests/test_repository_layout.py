"""The repository's files, configs and packages, the merged view of worker hosts, and a host's
load/drain/unload logic (with stand-ins for the queue and the batch loops)."""

from __future__ import annotations

import io
import tarfile
import threading
import time
from pathlib import Path

import pytest

from ppml_serve.engines.package import ModelPackage
from ppml_serve.errors import ConfigError, EngineError
from ppml_serve.gateway.repository import RepositoryView
from ppml_serve.models import demo_model_path
from ppml_serve.queue.contract import HostStatus, ModelState, VersionState, VersionStatus
from ppml_serve.repository import ModelConfig, ModelEntry, Repository, VersionPolicy
from ppml_serve.worker.runner import LoadedVersion


def test_version_policies_pick_versions_newest_first() -> None:
    present = ["1", "10", "2", "3"]
    assert VersionPolicy().select(present) == ["10"]
    assert VersionPolicy(latest=2).select(present) == ["10", "3"]
    assert VersionPolicy(specific=(1, 3, 7)).select(present) == ["3", "1"]
    assert VersionPolicy(all=True).select(present) == ["10", "3", "2", "1"]
    with pytest.raises(ValueError, match="one of latest, specific or all"):
        VersionPolicy(latest=1, all=True)


def test_config_errors_name_the_file_the_field_and_the_value(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("engine: tensorrt\nmax_batch_size: 0\n")
    with pytest.raises(ConfigError) as caught:
        ModelConfig.load(config)
    message = str(caught.value)
    assert str(config) in message and "'tensorrt'" in message and "max_batch_size" in message
    config.write_text("surprise: 1\n")
    with pytest.raises(ConfigError, match="surprise"):
        ModelConfig.load(config)
    assert ModelConfig.load(tmp_path / "absent.yaml") == ModelConfig()


def test_repository_reads_versions_and_refuses_ambiguous_ones(tmp_path: Path) -> None:
    model = tmp_path / "m"
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.onnx").write_bytes(demo_model_path().read_bytes())
    (model / "2").mkdir()
    (model / "notes").mkdir()  # not a version: ignored
    repository = Repository(tmp_path)
    assert repository.available() == {"m": ["1", "2"]}
    with pytest.raises(ConfigError, match=r"exactly one model.*found nothing"):
        repository.entry("m")
    (model / "2" / "a.onnx").write_bytes(b"x")
    (model / "2" / "b.onnx").write_bytes(b"y")
    with pytest.raises(ConfigError, match=r"found a\.onnx, b\.onnx"):
        repository.entry("m")
    (model / "2" / "b.onnx").unlink()
    entry = repository.entry("m")
    assert entry.served_versions() == ["2"] and entry.versions["1"].kind == "onnx"
    with pytest.raises(ConfigError, match="not in the repository"):
        repository.entry("other")
    with pytest.raises(ConfigError, match="both in the repository and given with --model"):
        Repository(tmp_path, {"m": demo_model_path()})
    with pytest.raises(ConfigError, match="no such model file"):
        Repository(None, {"x": tmp_path / "missing.onnx"})


def test_ir_archives_are_deterministic_and_hostile_ones_refused() -> None:
    package = ModelPackage.openvino_ir(b"<net/>", b"\x00" * 10)
    blob = package.to_bytes()
    assert blob == ModelPackage.openvino_ir(b"<net/>", b"\x00" * 10).to_bytes()
    assert ModelPackage.from_bytes(blob) == package
    onnx = demo_model_path().read_bytes()
    assert ModelPackage.from_bytes(onnx).format == "onnx"

    def archive(*members: tuple[str, bytes]) -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return buffer.getvalue()

    with pytest.raises(EngineError, match=r"only model\.xml and model\.bin"):
        ModelPackage.from_bytes(archive(("../../etc/passwd", b"x")))
    with pytest.raises(EngineError, match=r"needs model\.xml and model\.bin"):
        ModelPackage.from_bytes(archive(("model.xml", b"<net/>")))


def _host(name: str, versions: dict[str, VersionStatus], serial: int = 0,
          available: list[str] | None = None) -> HostStatus:
    return HostStatus(name, time.time(), {"m": available or sorted(versions)},
                      {"m": versions}, {}, {"m": serial})


def test_the_gateway_merges_hosts_and_knows_when_a_request_settled() -> None:
    ready, loading = VersionStatus(VersionState.READY), VersionStatus(VersionState.LOADING)
    failed = VersionStatus(VersionState.UNAVAILABLE, "no keys")
    view = RepositoryView([_host("a", {"1": ready, "2": loading}, serial=3),
                           _host("b", {"2": failed}, serial=2, available=["1", "2", "3"])])
    assert view.ready_versions("m") == ["1"]
    assert view.present("m") == ["3", "2", "1"]
    assert view.states("m")["2"].state is VersionState.LOADING  # one host still loading
    assert not view.settled("m", 3)  # b has not acted on request 3, a is loading
    view = RepositoryView([_host("a", {"1": ready, "2": failed}, serial=3)])
    assert view.settled("m", 3) and view.failures("m") == ["version 2: no keys"]
    rows = {row["version"]: row for row in RepositoryView(
        [_host("a", {"1": ready}, available=["1", "2"])]).index()}
    assert rows["1"]["state"] == "READY"
    assert rows["2"] == {"name": "m", "version": "2", "state": "UNAVAILABLE",
                         "reason": "not loaded"}


class _Control:
    """Stands in for the queue's repository records."""

    def __init__(self) -> None:
        self.states: dict[str, ModelState] = {}
        self.last: HostStatus | None = None

    def model_states(self) -> dict[str, ModelState]:
        return dict(self.states)

    def publish_host(self, status: HostStatus, max_age_s: float) -> None:
        self.last = status

    def forget_host(self, host: str) -> None:
        self.last = None


class _Loop:
    """Stands in for a version's batch loop: runs until stopped."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._joined = threading.Event()

    def run(self) -> None:
        self._joined.set()  # as a Worker does once its spec is announced
        self._stop.wait()

    @property
    def joined(self) -> bool:
        return self._joined.is_set()

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()


def test_a_host_replaces_a_version_only_after_its_successor_is_ready_and_drained(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ppml_serve.worker import host as host_module

    monkeypatch.setattr(host_module, "QUIET_BEFORE_UNLOAD_S", 0.05)
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "model.onnx").write_bytes(demo_model_path().read_bytes())
    control, backlog = _Control(), {"m": 0, "m@2": 0}
    successor_may_load = threading.Event()

    def load(entry: ModelEntry, version: str) -> LoadedVersion:
        if version == "2":
            successor_may_load.wait(10)
        return LoadedVersion(entry.name, version, None, None, None, "")  # type: ignore[arg-type]

    host = host_module.ModelHost(Repository(tmp_path), control, load,
                                 lambda loaded: _Loop(),  # type: ignore[arg-type,return-value]
                                 backlog.__getitem__, max_age_s=1.0, poll_s=0.01)

    def states() -> dict[str, str]:
        host.step()
        assert control.last is not None
        return {v: s.state.value for v, s in control.last.versions.get("m", {}).items()}

    def wait_for(expected: dict[str, str]) -> None:
        deadline = time.monotonic() + 10
        while (seen := states()) != expected and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seen == expected

    assert host.start() == [] and states() == {"1": "READY"}
    scaled = tmp_path / "m" / "2"
    scaled.mkdir()
    (scaled / "model.onnx").write_bytes(demo_model_path().read_bytes())
    assert states() == {"1": "READY"}  # nothing changes before a load request
    control.states["m"] = ModelState("load", 1)
    assert states() == {"1": "READY", "2": "LOADING"}  # the old one serves meanwhile
    successor_may_load.set()
    backlog["m"] = 5  # requests still queued for version 1
    wait_for({"1": "UNLOADING", "2": "READY"})
    time.sleep(0.2)
    assert states() == {"1": "UNLOADING", "2": "READY"}  # not before its queue is empty
    backlog["m"] = 0
    wait_for({"2": "READY"})
    backlog["m@2"] = 3  # an unload asked while requests are queued ...
    control.states["m"] = ModelState("unload", 2)
    wait_for({"2": "UNLOADING"})
    control.states["m"] = ModelState("load", 3)  # ... and taken back before it stopped
    wait_for({"2": "READY"})
    backlog["m@2"] = 0
    control.states["m"] = ModelState("unload", 4)
    wait_for({})
    assert control.last is not None and control.last.serials == {"m": 4}
    control.states["m"] = ModelState("load", 5)  # and back again after it stopped
    wait_for({"2": "READY"})
    host.stop()
    host.run()  # stops at once, drains nothing left
