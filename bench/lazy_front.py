"""A package front that loads its rooms on first use (PEP 562 module ``__getattr__``).

Used by the fronts whose rooms pull in heavy imports (torch, pandas, rich, the launch side) that most users
of one name do not need: ``__getattr__, __dir__ = lazy_front(__name__, ROOMS, globals(), __all__)``.
"""

from __future__ import annotations

from importlib import import_module
from typing import Callable


def lazy_front(package: str, rooms: dict[str, str], namespace: dict,
               public: list[str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """The module ``__getattr__`` and ``__dir__`` of ``package``: a name in ``rooms`` (name -> room module)
    is imported from ``package.room`` when first asked for, then kept in ``namespace`` (the package's
    globals), so later lookups do not come back here."""

    def __getattr__(name: str):
        if name not in rooms:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(f"{package}.{rooms[name]}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(public))

    return __getattr__, __dir__
