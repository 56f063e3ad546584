"""Read-only, hashable JSON values for the recipe's free-form parts (ROI parameters, export provenance), so that a
Recipe is frozen all the way down: objects become FrozenMaps and lists tuples; `thaw` gives the JSON back."""

from __future__ import annotations

from collections.abc import Iterator, Mapping


class FrozenMap(Mapping):
    """An immutable mapping with a hash (over its items, which must be frozen themselves)."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping = ()):
        self._items = dict(items)

    def __getitem__(self, key):
        return self._items[key]

    def __iter__(self) -> Iterator:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __repr__(self) -> str:
        return f"FrozenMap({self._items!r})"


def freeze(value):
    """A JSON value made immutable: dicts → FrozenMap, lists → tuples, recursively."""
    if isinstance(value, Mapping):
        return FrozenMap({key: freeze(item) for key, item in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(freeze(item) for item in value)
    return value


def thaw(value):
    """The JSON value again: FrozenMaps → dicts, tuples → lists, recursively."""
    if isinstance(value, Mapping):
        return {key: thaw(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [thaw(item) for item in value]
    return value
