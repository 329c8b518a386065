"""The gateway's view of the model repository, merged from every live worker host's status:
which versions exist, which are ready, and whether a load or unload request has settled."""

from __future__ import annotations

from dataclasses import dataclass, field

from ppml_serve.queue.contract import HostStatus, VersionState, VersionStatus

# When hosts disagree, the most useful state wins: one host ready means the version serves.
_RANK = {VersionState.READY: 0, VersionState.LOADING: 1, VersionState.UNLOADING: 2,
         VersionState.UNAVAILABLE: 3}


def _newest_first(versions: set[str] | list[str]) -> list[str]:
    return sorted(versions, key=int, reverse=True)


@dataclass
class RepositoryView:
    hosts: list[HostStatus] = field(default_factory=list)

    def names(self) -> set[str]:
        return {name for host in self.hosts for name in (*host.available, *host.versions)}

    def knows(self, model: str) -> bool:
        return model in self.names()

    def states(self, model: str) -> dict[str, VersionStatus]:
        """The merged state of each version some host serves, loads or failed to load."""
        merged: dict[str, VersionStatus] = {}
        for host in self.hosts:
            for version, status in host.versions.get(model, {}).items():
                current = merged.get(version)
                if current is None or _RANK[status.state] < _RANK[current.state]:
                    merged[version] = status
        return merged

    def ready_versions(self, model: str) -> list[str]:
        """Versions that serve now, newest first."""
        return _newest_first([v for v, s in self.states(model).items()
                              if s.state is VersionState.READY])

    def present(self, model: str) -> list[str]:
        """Versions some host's repository holds or serves, newest first."""
        found = {v for host in self.hosts for v in host.available.get(model, [])}
        return _newest_first(found | set(self.states(model)))

    def index(self) -> list[dict[str, str]]:
        """Triton's repository index: every model and version, with state and reason."""
        rows = []
        for model in sorted(self.names()):
            states = self.states(model)
            error = next((host.errors[model] for host in self.hosts if model in host.errors), "")
            versions = self.present(model)
            if not versions:
                rows.append({"name": model, "version": "", "state": "UNAVAILABLE",
                             "reason": error or "no versions"})
            for version in reversed(versions):
                status = states.get(version)
                state = status.state.value if status else "UNAVAILABLE"
                reason = (status.reason if status else "") or (
                    "" if status else error or "not loaded")
                rows.append({"name": model, "version": version, "state": state,
                             "reason": reason})
        return rows

    def settled(self, model: str, serial: int) -> bool:
        """Whether every live host holding ``model`` has acted on request ``serial`` and
        finished loading or draining it."""
        holders = [h for h in self.hosts if model in h.available or model in h.versions]
        if not holders:
            return False
        for host in holders:
            if host.serials.get(model, -1) < serial:
                return False
            if any(s.state in (VersionState.LOADING, VersionState.UNLOADING)
                   for s in host.versions.get(model, {}).values()):
                return False
        return True

    def failures(self, model: str) -> list[str]:
        """Why versions of ``model`` are unavailable (for a load that did not succeed)."""
        # a READY version with a reason: loading it again failed, its previous load serves
        reasons = [f"version {version}: {status.reason}"
                   for version, status in sorted(self.states(model).items())
                   if status.state in (VersionState.UNAVAILABLE, VersionState.READY)
                   and status.reason]
        reasons += [host.errors[model] for host in self.hosts if model in host.errors]
        return list(dict.fromkeys(reasons))
