"""One small generic registry whose names resolve lazily from entry points.

Built-in methods and datasets are declared in pyproject.toml under the same
entry-point groups third-party packages use, so the plugin path is the only
path. A broken plugin fails when it is used, not at start-up.
"""
from __future__ import annotations

from importlib.metadata import entry_points

from harness import HarnessError

METHODS_GROUP = "harness.methods"
DATASETS_GROUP = "harness.datasets"


class Registry:
    def __init__(self, group: str, kind: str):
        self.group = group
        self.kind = kind
        self._local: dict[str, object] = {}
        self._loaded: dict[str, object] = {}

    def _entry_points(self) -> dict[str, list]:
        found: dict[str, list] = {}
        for ep in entry_points(group=self.group):
            found.setdefault(ep.name, [])
            if ep.value not in [e.value for e in found[ep.name]]:
                found[ep.name].append(ep)
        return found

    def names(self) -> list[str]:
        return sorted(set(self._entry_points()) | set(self._local))

    def register(self, name: str, obj: object) -> None:
        """Register an object in-process (tests, notebooks)."""
        existing = self._local.get(name)
        if existing is not None and existing is not obj:
            raise HarnessError(f"{self.kind} '{name}' is already registered to {existing!r}")
        if name in self._entry_points():
            raise HarnessError(f"{self.kind} '{name}' is already provided by an installed package")
        self._local[name] = obj

    def unregister(self, name: str) -> None:
        self._local.pop(name, None)
        self._loaded.pop(name, None)

    def get(self, name: str):
        if name in self._local:
            return self._local[name]
        if name in self._loaded:
            return self._loaded[name]
        eps = self._entry_points().get(name)
        if not eps:
            known = ", ".join(self.names()) or "none"
            raise HarnessError(f"unknown {self.kind} '{name}'; known {self.kind}s: {known}")
        if len(eps) > 1:
            targets = ", ".join(ep.value for ep in eps)
            raise HarnessError(f"{self.kind} '{name}' is registered twice, to {targets}; uninstall one")
        ep = eps[0]
        try:
            obj = ep.load()
        except Exception as exc:  # a plugin may raise anything on import
            raise HarnessError(
                f"{self.kind} plugin '{name}' ({ep.value}) failed to load: {type(exc).__name__}: {exc}"
            ) from exc
        self._loaded[name] = obj
        return obj


METHODS = Registry(METHODS_GROUP, "method")
DATASETS = Registry(DATASETS_GROUP, "dataset")
