"""Why a configuration was not chosen, as typed values: one class per kind, each with the numbers that decided
it as fields, and the sentence `llmrun plan` prints (`reason`) derived from them.

    kind                        fields                                      printed as
    TOO_BIG                     device, needed, available, unified          needs 23.8 GiB on GPU0, 23.5 GiB free
    TOO_BIG_FOR_UNIFIED_MEMORY  needed, available                           needs … of unified memory, … available
    MACHINE_TOO_SMALL           needed, available, memory                   needs 121.7 GiB at least, 38.6 GiB …
    WEIGHTS_TOO_BIG             needed, available, memory                   weights alone need …, … RAM available
    OVER_DOWNLOAD_LIMIT         size, limit                                 download 41.4 GB > --max-download 20.0 GB
    CANNOT_ESTIMATE             message                                     cannot estimate: …
    TOO_SLOW_NOT_ESTIMATED      bound_tps, threshold_tps                    too slow here: at most 1.2 tok/s (< 3), …
    NOT_ESTIMATED               than                                        ranked below …; not estimated (--all)
    TOO_SLOW                    than, placement, decode_tps, threshold_tps  fits (…), too slow: 2.3 tok/s < 3 tok/s
    SLOWER                      than, placement, decode_tps, than_tps       fits (…), slower: 9.1 tok/s
    BELOW_QUALITY_FLOOR         than, floor                                 fits, below the Q4_0 quality floor
    RANKED_LOWER                than, placement, decode_tps                 fits (…, 1.2 tok/s), ranked below …

The first four are memory: the configuration (or, for the last two, anything of that entry) does not fit. The
next four never got a memory estimate. The last four fit but lost to the choice (`than` names it). Pure values:
no hardware, no catalog.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from enum import Enum
from typing import ClassVar, Literal

from runner.core.units import format_size

Placement = Literal["gpu", "experts-in-ram", "partial", "cpu"]
PLACEMENTS: tuple[Placement, ...] = ("gpu", "experts-in-ram", "partial", "cpu")   # best first
PLACEMENT_LABEL: dict[Placement, str] = {
    "gpu": "full GPU offload", "experts-in-ram": "dense layers on GPU, experts in RAM",
    "partial": "partial GPU offload", "cpu": "CPU only"}


class RuledOutKind(Enum):
    TOO_BIG = "too_big"                                      # a device of this configuration is short
    TOO_BIG_FOR_UNIFIED_MEMORY = "too_big_for_unified_memory"  # its devices together exceed the shared RAM
    MACHINE_TOO_SMALL = "machine_too_small"                  # even the entry's most frugal configuration
    WEIGHTS_TOO_BIG = "weights_too_big"                      # the download alone is more than all memory
    OVER_DOWNLOAD_LIMIT = "over_download_limit"              # bigger than --max-download
    CANNOT_ESTIMATE = "cannot_estimate"                      # the estimator has no tensor recipe for it
    TOO_SLOW_NOT_ESTIMATED = "too_slow_not_estimated"        # its speed bound is below the usable speed
    NOT_ESTIMATED = "not_estimated"                          # could not rank above the choice (--all sizes it)
    TOO_SLOW = "too_slow"                                    # fits, but decodes below the usable speed
    SLOWER = "slower"                                        # --prefer speed: fits, slower than the choice
    BELOW_QUALITY_FLOOR = "below_quality_floor"              # --prefer speed: quant below the floor
    RANKED_LOWER = "ranked_lower"                            # fits, the choice ranks above it


class Memory(Enum):
    """All the memory of a machine, as a refusal names it."""

    RAM = "ram"                      # no GPU: host RAM
    RAM_AND_VRAM = "ram_and_vram"    # host RAM and every GPU's (or RPC worker's) free memory together
    UNIFIED = "unified"              # the RAM the host and its GPU share (Apple)

    @property
    def label(self) -> str:
        return {"ram": "RAM available", "ram_and_vram": "in RAM and VRAM together",
                "unified": "of unified memory available"}[self.value]


class RuledOut(ABC):
    """Why a candidate was not chosen: one subclass per `RuledOutKind`, an immutable value whose fields (its
    `__slots__`, in order) are the figures that decided it. Plain slotted classes rather than dataclasses:
    twelve frozen dataclasses cost `llmrun plan` about 4 ms to create at import, these almost nothing."""

    __slots__: tuple[str, ...] = ()
    kind: ClassVar[RuledOutKind]

    def __init__(self, *values: object) -> None:
        for name, value in zip(self.__slots__, values, strict=True):
            object.__setattr__(self, name, value)

    @property
    @abstractmethod
    def reason(self) -> str:
        """The one line `llmrun plan` prints for it."""

    def fields(self) -> dict[str, object]:
        """Field name → value, in order."""
        return {name: getattr(self, name) for name in self.__slots__}

    def to_dict(self) -> dict[str, object]:
        """{"kind": ..., field: value, ...} for --json."""
        out: dict[str, object] = {"kind": self.kind.value}
        for name, value in self.fields().items():
            out[name] = value.value if isinstance(value, Enum) else value
        return out

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable: cannot set {name}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable: cannot delete {name}")

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, RuledOut)
        return tuple(self.fields().values()) == tuple(other.fields().values())

    def __hash__(self) -> int:
        return hash((type(self).__name__, *self.fields().values()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.fields().items())})"


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def _tps(x: float | None) -> str:
    return f"{x:.1f} tok/s" if x is not None else "?"


# ------------------------------------------------------------------------------------------------- memory
class TooBig(RuledOut):
    """One device needs more than it has: `device` is the estimate's name ("CPU" = host RAM, "GPU0", "RPC1")."""

    __slots__ = ("device", "needed", "available", "unified")
    kind = RuledOutKind.TOO_BIG
    device: str
    needed: int
    available: int
    unified: bool                    # the host's RAM is shared with the GPU (Apple)

    def __init__(self, device: str, needed: int, available: int, unified: bool = False) -> None:
        super().__init__(device, needed, available, unified)

    @property
    def reason(self) -> str:
        if self.device == "CPU":
            where = "unified memory" if self.unified else "RAM"
            return f"needs {format_size(self.needed)} {where}, {format_size(self.available)} available"
        return f"needs {format_size(self.needed)} on {self.device}, {format_size(self.available)} free"


class TooBigForUnifiedMemory(RuledOut):
    """Unified memory: each device's share fits, all of them together exceed the RAM they share."""

    __slots__ = ("needed", "available")
    kind = RuledOutKind.TOO_BIG_FOR_UNIFIED_MEMORY
    needed: int
    available: int

    def __init__(self, needed: int, available: int) -> None:
        super().__init__(needed, available)

    @property
    def reason(self) -> str:
        return f"needs {format_size(self.needed)} of unified memory, {format_size(self.available)} available"


class MachineTooSmall(RuledOut):
    """The entry's most frugal configuration (CPU, least context, smallest KV) needs more than all memory."""

    __slots__ = ("needed", "available", "memory")
    kind = RuledOutKind.MACHINE_TOO_SMALL
    needed: int
    available: int
    memory: Memory

    def __init__(self, needed: int, available: int, memory: Memory) -> None:
        super().__init__(needed, available, memory)

    @property
    def reason(self) -> str:
        return f"needs {format_size(self.needed)} at least, {format_size(self.available)} {self.memory.label}"


class WeightsTooBig(RuledOut):
    """The download alone (less the catalog's rounding) is more than all memory; nothing was estimated."""

    __slots__ = ("needed", "available", "memory")
    kind = RuledOutKind.WEIGHTS_TOO_BIG
    needed: int
    available: int
    memory: Memory

    def __init__(self, needed: int, available: int, memory: Memory) -> None:
        super().__init__(needed, available, memory)

    @property
    def reason(self) -> str:
        return f"weights alone need {format_size(self.needed)}, {format_size(self.available)} {self.memory.label}"


# ------------------------------------------------------------------------------------------------- not estimated
class OverDownloadLimit(RuledOut):
    __slots__ = ("size", "limit")
    kind = RuledOutKind.OVER_DOWNLOAD_LIMIT
    size: int                        # bytes to download
    limit: int                       # --max-download, bytes

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(size, limit)

    @property
    def reason(self) -> str:
        return f"download {_gb(self.size)} > --max-download {_gb(self.limit)}"


class CannotEstimate(RuledOut):
    __slots__ = ("message",)
    kind = RuledOutKind.CANNOT_ESTIMATE
    message: str                     # the estimator's error

    def __init__(self, message: str) -> None:
        super().__init__(message)

    @property
    def reason(self) -> str:
        return f"cannot estimate: {self.message}"


class TooSlowNotEstimated(RuledOut):
    """Its upper bound on decode speed here (from the download size) is below the usable speed, and something
    usable was chosen."""

    __slots__ = ("bound_tps", "threshold_tps")
    kind = RuledOutKind.TOO_SLOW_NOT_ESTIMATED
    bound_tps: float
    threshold_tps: float

    def __init__(self, bound_tps: float, threshold_tps: float) -> None:
        super().__init__(bound_tps, threshold_tps)

    @property
    def reason(self) -> str:
        return f"too slow here: at most {self.bound_tps:.1f} tok/s (< {self.threshold_tps:g}), not estimated"


class NotEstimated(RuledOut):
    """Quality mode: no configuration of it could rank above the choice, so none was estimated."""

    __slots__ = ("than",)
    kind = RuledOutKind.NOT_ESTIMATED
    than: str | None                 # the choice's name; None when nothing was chosen

    def __init__(self, than: str | None) -> None:
        super().__init__(than)

    @property
    def reason(self) -> str:
        return f"ranked below {self.than or 'the choice'}; not estimated (--all)"


# ------------------------------------------------------------------------------------------------- fits, lost
class TooSlow(RuledOut):
    """It fits and ranks above the choice, but decodes below the usable speed, which the choice reaches."""

    __slots__ = ("than", "placement", "decode_tps", "threshold_tps")
    kind = RuledOutKind.TOO_SLOW
    than: str
    placement: Placement
    decode_tps: float
    threshold_tps: float

    def __init__(self, than: str, placement: Placement, decode_tps: float, threshold_tps: float) -> None:
        super().__init__(than, placement, decode_tps, threshold_tps)

    @property
    def reason(self) -> str:
        return (f"fits ({PLACEMENT_LABEL[self.placement]}), too slow: {_tps(self.decode_tps)} < "
                f"{self.threshold_tps:g} tok/s")


class Slower(RuledOut):
    """--prefer speed: it fits and decodes slower than the choice."""

    __slots__ = ("than", "placement", "decode_tps", "than_tps")
    kind = RuledOutKind.SLOWER
    than: str
    placement: Placement
    decode_tps: float
    than_tps: float

    def __init__(self, than: str, placement: Placement, decode_tps: float, than_tps: float) -> None:
        super().__init__(than, placement, decode_tps, than_tps)

    @property
    def reason(self) -> str:
        return f"fits ({PLACEMENT_LABEL[self.placement]}), slower: {_tps(self.decode_tps)}"


class BelowQualityFloor(RuledOut):
    """--prefer speed: it fits, but its quant is below the floor speed mode keeps to."""

    __slots__ = ("than", "floor")
    kind = RuledOutKind.BELOW_QUALITY_FLOOR
    than: str
    floor: str                       # the floor quant, e.g. "Q4_0"

    def __init__(self, than: str, floor: str) -> None:
        super().__init__(than, floor)

    @property
    def reason(self) -> str:
        return f"fits, below the {self.floor} quality floor"


class RankedLower(RuledOut):
    """It fits; the choice ranks above it (placement, size, context, quant, ...; or speed with --prefer speed)."""

    __slots__ = ("than", "placement", "decode_tps")
    kind = RuledOutKind.RANKED_LOWER
    than: str
    placement: Placement
    decode_tps: float | None         # None when no speed was predicted

    def __init__(self, than: str, placement: Placement, decode_tps: float | None) -> None:
        super().__init__(than, placement, decode_tps)

    @property
    def reason(self) -> str:
        return f"fits ({PLACEMENT_LABEL[self.placement]}, {_tps(self.decode_tps)}), ranked below {self.than}"


__all__ = ["RuledOut", "RuledOutKind", "Memory", "Placement", "PLACEMENTS", "PLACEMENT_LABEL", "TooBig",
           "TooBigForUnifiedMemory", "MachineTooSmall", "WeightsTooBig", "OverDownloadLimit", "CannotEstimate",
           "TooSlowNotEstimated", "NotEstimated", "TooSlow", "Slower", "BelowQualityFloor", "RankedLower"]
