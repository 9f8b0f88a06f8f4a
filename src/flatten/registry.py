"""Explicit registries keyed by plain strings."""

from __future__ import annotations

from typing import Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A named mapping from string keys to entries, with errors that list what is known."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T, *, replace: bool = False) -> T:
        if not isinstance(name, str) or not name:
            raise TypeError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if name in self._entries and not replace:
            raise ValueError(f"{self.kind} {name!r} is already registered; pass replace=True to override it")
        self._entries[name] = entry
        return entry

    def register_factory(self, name: str, factory: T | None = None, *, replace: bool = False):
        """Register a class or factory (anything callable) under ``name``; without ``factory``, a class
        decorator that does so."""
        if factory is None:
            return lambda f: self.register_factory(name, f, replace=replace)
        if not callable(factory):
            raise TypeError(f"a {self.kind} factory must be callable, got {type(factory).__name__}")
        return self.register(name, factory, replace=replace)

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            known = ", ".join(sorted(self._entries)) or "none registered"
            raise ValueError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def build(self, entry, base: type, **options):
        """An instance of ``base``: made by the factory registered as ``entry`` (a name) with ``options``, or
        ``entry`` itself where it is already one (then without options)."""
        if isinstance(entry, base):
            if options:
                raise ValueError(f"options are only accepted with a {self.kind} name, not with a {base.__name__} "
                                 f"instance (got {sorted(options)})")
            return entry
        instance = self.get(entry)(**options)
        if not isinstance(instance, base):
            raise TypeError(f"{self.kind} {entry!r} made a {type(instance).__name__}, not a {base.__name__}")
        return instance

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def unregister(self, name: str) -> T:
        """Remove and return an entry (for tests and notebooks that register temporarily)."""
        entry = self.get(name)
        del self._entries[name]
        return entry
