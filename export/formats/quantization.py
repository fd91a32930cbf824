"""The ``--quantize`` setting of a package: ``none``, ``int8`` (per output channel) or ``int4[:G]`` (per group).

Pure data (no torch): the compiler quantizes with it (:mod:`lorafleet.export.compiler.quantize`), the manifest
records it, and a backend that rebuilds the base model (the torch backend) reads it back to quantize the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lorafleet.export.formats.errors import ConfigError

Mode = Literal["none", "int8", "int4"]
MODES: tuple[Mode, ...] = ("none", "int8", "int4")
DEFAULT_GROUP = 32


@dataclass(frozen=True)
class Quantization:
    """A ``--quantize`` value: ``none``, ``int8`` (per output channel) or ``int4`` with a group size."""

    mode: Mode = "none"
    group_size: int | None = None  # int4 only

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"quantize: unknown mode {self.mode!r} (known: none, int8, int4, int4:G)")
        if self.mode == "int4":
            g = self.group_size
            if not isinstance(g, int) or isinstance(g, bool) or g < 2 or g % 2:
                raise ConfigError(f"quantize: int4 group size must be an even integer ≥ 2, got {g!r}")
        elif self.group_size is not None:
            raise ConfigError(f"quantize: {self.mode} takes no group size")

    @classmethod
    def parse(cls, text: str) -> Quantization:
        """``none`` | ``int8`` | ``int4`` | ``int4:G`` (e.g. ``int4:64``)."""
        text = (text or "").strip().lower()
        mode, colon, group = text.partition(":")
        if mode == "int4":
            if not colon:
                return cls("int4", DEFAULT_GROUP)
            if not group.isdigit():
                raise ConfigError(f"quantize: int4 group size must be an integer, got {group!r} in {text!r}")
            return cls("int4", int(group))
        if colon:
            raise ConfigError(f"quantize: {mode!r} takes no group size (got {text!r})")
        if mode not in MODES:
            raise ConfigError(f"quantize: unknown mode {text!r} (known: none, int8, int4, int4:G)")
        return cls(mode)  # mode is one of MODES (checked above)

    def __str__(self) -> str:
        return f"int4:{self.group_size}" if self.mode == "int4" else self.mode

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def block(self, in_features: int) -> int:
        """Inputs per scale for a row of ``in_features``."""
        return in_features if self.mode == "int8" else int(self.group_size or DEFAULT_GROUP)


    def check(self, name: str, in_features: int) -> None:
        if self.mode == "int4" and in_features % self.block(in_features):
            raise ConfigError(f"quantize {self}: {name} has {in_features} inputs, not a multiple of the group "
                              f"size {self.group_size} (choose int4:G with G dividing {in_features})")
