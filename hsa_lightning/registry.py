"""One registry per plugin kind, filled from Python entry points.

Every plugin, built-in or third-party, arrives the same way: an entry point in the group
``hsa_lightning.<kind>`` whose name is its primary alias and whose value is a top-level class
(``pkg.module:Class``). A plugin is then found by that alias, by its class name, or by any name in
its ``aliases`` class attribute. Loading the classes before LightningCLI parses is what lets YAML
and the command line use short names.
"""
from __future__ import annotations

import difflib
import importlib.metadata as metadata
import warnings
from dataclasses import dataclass
from typing import Generic, Iterable, TypeVar

from hsa_lightning.errors import PluginError

T = TypeVar("T")

KINDS = ("attention", "layout", "position", "curriculum", "ffn")


@dataclass(frozen=True)
class _Entry:
    cls: type
    origin: str  # where it came from, for error messages: "dist 1.0 (pkg.mod:Class)"


class Registry(Generic[T]):
    """Name -> plugin class for one kind; names are entry-point aliases, class names and ``aliases``."""

    def __init__(self, kind: str, base: type[T]):
        if kind not in KINDS:
            raise ValueError(f"unknown plugin kind {kind!r}; kinds are {', '.join(KINDS)}")
        self.kind = kind
        self.base = base
        self.group = f"hsa_lightning.{kind}"
        self._entries: dict[str, _Entry] = {}
        self._broken: dict[str, str] = {}  # entry-point name -> why it failed to load

    # -- filling -------------------------------------------------------------------------------
    def add(self, name: str, cls: type, origin: str = "") -> None:
        """Register ``cls`` under ``name``, its class name and its ``aliases``; idempotent per class."""
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise PluginError(
                f"{self.kind} plugin {name!r} from {origin or 'unknown origin'} is {cls!r}, "
                f"which is not a subclass of {self.base.__module__}.{self.base.__qualname__}"
            )
        origin = origin or f"{cls.__module__}:{cls.__qualname__}"
        names = list(dict.fromkeys((name, cls.__name__, *getattr(cls, "aliases", ()))))
        for alias in names:  # check every name before adding any, so a clash leaves no half entry
            known = self._entries.get(alias)
            if known is not None and known.cls is not cls:
                raise PluginError(
                    f"{self.kind} plugin name {alias!r} is claimed twice: by {known.origin} "
                    f"and by {origin}; uninstall one of them or rename its entry point"
                )
        for alias in names:
            self._entries.setdefault(alias, _Entry(cls, origin))

    def load_entry_points(self, entry_points: Iterable[metadata.EntryPoint] | None = None) -> None:
        """Import every entry point of this kind's group; a broken one is remembered, not fatal."""
        if entry_points is None:
            entry_points = metadata.entry_points(group=self.group)
        for ep in entry_points:
            dist = getattr(ep, "dist", None)
            where = f"distribution '{dist.name} {dist.version}'" if dist else "an unknown distribution"
            origin = f"{where} ({ep.value})"
            try:
                cls = ep.load()
            except Exception as exc:  # any import-time failure of third-party code
                self._broken[ep.name] = (
                    f"{self.kind} plugin {ep.name!r} from {origin} failed to import: "
                    f"{type(exc).__name__}: {exc}"
                )
                warnings.warn(self._broken[ep.name], stacklevel=2)
                continue
            self.add(ep.name, cls, origin)

    # -- lookup --------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> type[T]:
        return self._lookup(name).cls

    def origin(self, name: str) -> str:
        """Where the plugin called ``name`` came from (distribution and entry point)."""
        return self._lookup(name).origin

    def _lookup(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:  # forgive case: "flash" finds "Flash" when that is unambiguous
            folded = {self._entries[k] for k in self._entries if k.lower() == name.lower()}
            if len({e.cls for e in folded}) == 1:
                entry = folded.pop()
        if entry is not None:
            return entry
        if name in self._broken:
            raise PluginError(self._broken[name])
        known = self.names()
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise PluginError(
            f"unknown {self.kind} plugin {name!r}; known {self.kind} plugins: "
            f"{', '.join(known) or '(none)'}{hint}"
        )


_REGISTRIES: dict[str, Registry] = {}


def kind_registry(kind: str, base: type[T]) -> Registry[T]:
    """Create the process-wide registry of ``kind``; called once by the module defining ``base``."""
    _REGISTRIES[kind] = Registry(kind, base)
    return _REGISTRIES[kind]


def registry(kind: str) -> Registry:
    """The registry of ``kind`` (importing the core module that defines its base class)."""
    _import_bases()
    if kind not in _REGISTRIES:
        raise ValueError(f"unknown plugin kind {kind!r}; kinds are {', '.join(KINDS)}")
    return _REGISTRIES[kind]


_loaded = False


def load_plugins() -> None:
    """Import every installed plugin of every kind; idempotent. Call before LightningCLI parses."""
    global _loaded
    _import_bases()
    if _loaded:
        return
    for kind in KINDS:
        _REGISTRIES[kind].load_entry_points()
    _loaded = True


def _import_bases() -> None:
    # Each base class's module creates its kind's registry on import. Importing them lazily, here,
    # avoids a cycle: those modules import this one for Registry.
    import hsa_lightning.curriculum  # noqa: F401
    import hsa_lightning.model.attention_backend  # noqa: F401
    import hsa_lightning.model.ffn  # noqa: F401
    import hsa_lightning.model.layout  # noqa: F401
    import hsa_lightning.model.position  # noqa: F401


def build_plugin(kind: str, spec: object) -> object:
    """Turn what the config holds (an instance, a name, or ``{class_path, init_args}``) into an instance.

    LightningCLI hands over an instance when jsonargparse resolved the class itself, and a plain string
    for a bare name (``--model.attention flash``), which is looked up here by alias or class name.
    """
    reg = registry(kind)
    if isinstance(spec, reg.base):
        return spec
    if isinstance(spec, str):
        return reg.get(spec)()
    if isinstance(spec, dict) and "class_path" in spec:
        cls = reg.get(str(spec["class_path"]).rsplit(".", 1)[-1])
        init_args = dict(spec.get("init_args") or {})
        try:
            return cls(**init_args)
        except TypeError as exc:
            raise PluginError(f"{kind} plugin {cls.__name__} rejected init_args {init_args}: {exc}") from None
    raise PluginError(
        f"{kind}={spec!r} is not a {kind} plugin: give a name ({', '.join(reg.names())}) "
        f"or {{class_path: ..., init_args: ...}}"
    )
