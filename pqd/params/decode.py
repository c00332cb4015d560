"""The one typed decoder: nested dicts (params.yaml, a stage's metrics file) into nested frozen dataclasses.

:class:`Decoder` walks a dataclass's fields: an unknown key is refused, a missing key takes the field's
default (or is refused), a dataclass field is decoded in turn and any other is handed to :meth:`Decoder.leaf`.
What differs between documents is the wording of the errors and how a leaf is converted: a subclass says that.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any


class Decoder:
    """Decode a dict into ``cls``; ``where`` names the value in messages (a dotted key, or a file)."""

    def mapping(self, data: Any, where: str) -> dict:
        """``data`` as the mapping to decode; raise when it is not one."""
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a mapping, found {type(data).__name__}")
        return data

    def unknown(self, cls: type, key: str, names: list[str], where: str) -> Exception:
        return ValueError(f"{where}: unknown key {key!r}: expected one of {', '.join(names)}")

    def missing(self, cls: type, key: str, where: str) -> Exception | None:
        """The error for a missing key that has no default (None: leave it to the dataclass)."""
        return None

    def leaf(self, tp: Any, value: Any, where: str) -> Any:
        """A field that is not a dataclass, read as type ``tp``."""
        return value

    def field(self, tp: Any, value: Any, where: str) -> Any:
        return self.decode(tp, value, where) if dataclasses.is_dataclass(tp) else self.leaf(tp, value, where)

    @staticmethod
    def child(where: str, name: str) -> str:
        return f"{where}.{name}" if where else name

    def decode(self, cls: type, data: Any, where: str = "") -> Any:
        data = self.mapping(data, where)
        hints = typing.get_type_hints(cls)
        fields = dataclasses.fields(cls)
        names = [f.name for f in fields]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise self.unknown(cls, unknown[0], names, where)
        for f in fields:
            if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                error = self.missing(cls, f.name, where)
                if error is not None:
                    raise error
        return cls(**{n: self.field(hints[n], data[n], self.child(where, n)) for n in names if n in data})
