"""Name -> object registries. Unknown names raise with close matches."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from .errors import KDistillError, unknown_name

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from snake_case names to classes or factories.

    >>> R = Registry("method")
    >>> @R.register("demo")
    ... class Demo: ...
    >>> R.get("demo") is Demo
    True
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        if not name or name != name.lower() or " " in name or "-" in name:
            raise KDistillError(
                f"{self.kind} name: got {name!r}, expected a snake_case name such as 'hinton_kd'."
            )

        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise KDistillError(
                    f"{self.kind} {name!r} is registered twice ({self._items[name]!r} and {obj!r}); "
                    "pick another name."
                )
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise unknown_name(self.kind, name, self._items,
                               f"Run `kdistill list` to see every {self.kind}.") from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())


METHODS: Registry[Any] = Registry("method")
MODELS: Registry[Any] = Registry("model")
DATASETS: Registry[Any] = Registry("dataset")
TASKS: Registry[Any] = Registry("task")
AUGMENTS: Registry[Any] = Registry("augmentation")
SELECTORS: Registry[Any] = Registry("selection method")  # data selection strategies (kdistill.data.selection)
