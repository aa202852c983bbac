"""Registries: name → object, filled by registration, the way timm registers models.

Each concept that users choose by name has one registry, filled where the thing is
defined: masking strategies (:data:`mwm.masking.MASKINGS`), vision-language model
backends (:data:`mwm.localize.vlm.VLM_BACKENDS`) and downstream evaluation tasks
(:data:`mwm.downstream.tasks.TASKS`). Command-line choices, config validation, experiment
keys, result tables and plot markers read the registries, so a name is written once, at
its registration.
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from .errors import DataError

T = TypeVar("T")


class Registry(Generic[T]):
    """An ordered mapping from names to registered objects of one ``kind``."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        """Add ``item`` under ``name`` (a name is registered once) and return it."""
        if not name or name != name.strip():
            raise ValueError(f"{self.kind} name must be a non-empty word, got {name!r}")
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        """The object registered as ``name``; an unknown name is a :class:`DataError`."""
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise DataError(f"unknown {self.kind} {name!r}; choose one of "
                            f"{', '.join(self._items)}.") from None

    def names(self) -> tuple[str, ...]:
        return tuple(self._items)

    def items(self) -> list[tuple[str, T]]:
        return list(self._items.items())

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[T]:
        return iter(self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._items)})"


class LazyChoices:
    """Choices for argparse that read a registry only when used (parsing or help), so that
    building the parser does not import the modules that fill the registry."""

    def __init__(self, names: Callable[[], tuple[str, ...]]):
        self._names = names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, value: object) -> bool:
        return value in self._names()

    def __len__(self) -> int:
        return len(self._names())

    def __repr__(self) -> str:
        return repr(list(self._names()))
