"""A small explicit registry (torchvision's ``register_model`` / timm's ``list_models`` shape)."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Generic, TypeVar

from featurecache.errors import FeaturecacheError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> spec. Duplicates are refused; unknown names raise an error that lists the valid ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, spec: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = spec
        return spec

    def names(self, pattern: str = "*", *, where: Callable[[T], bool] | None = None) -> list[str]:
        """Sorted names matching an fnmatch ``pattern`` (and the ``where`` predicate, if given)."""
        return sorted(n for n, s in self._items.items() if fnmatch.fnmatch(n, pattern) and (where is None or where(s)))

    def get(self, name: str) -> T:
        if name not in self._items:
            raise FeaturecacheError(f"unknown {self.kind} {name!r}; choose from: {', '.join(self.names())}")
        return self._items[name]
