"""Where the LoRA branches of a switchable graph sit, and how adapter weights are laid out for them (numpy only).

A *slot* is the low-rank branch at one Linear layer of the base: graph inputs ``<module>.lora_A`` (in, r) and
``<module>.lora_B`` (r, out). They are PEFT's ``lora_A.weight`` (r, in) and ``lora_B.weight`` (out, r)
transposed, in the layout the graph multiplies with (``x @ A @ B``), with the adapter's scaling (lora_alpha / r,
or lora_alpha / sqrt(r) with rsLoRA) folded into ``B``. The rank is free per slot and per adapter; a slot an
adapter leaves out keeps the graph's rank-0 default and contributes exactly nothing.

Where an exported adapter needs them (DoRA, IA3), a slot also has scale vectors ``<module>.lora_scale_in`` (in,),
``<module>.lora_scale_out`` (out,) and ``<module>.lora_scale_post`` (out,) whose default is ones; what each
multiplies is in ``methods/branch.py``. An adapter file holds only the scales its adapter uses, so files written
before scales existed load unchanged.

A *saved parameter* is a parameter of a module an adapter trains a full copy of (PEFT's ``modules_to_save``: a
Dense layer, a classification head). The graph takes ``<param>.saved_value`` (the copy; default a broadcastable
zero) and ``<param>.saved_use`` ((1,); default 0) and runs ``where(saved_use > 0.5, saved_value, base value)``, so
an adapter file that carries both runs its own copy and everything else runs the base's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from ..methods.base import MAX_RANK  # as for adapter configs (base: torch-free, unlike the methods' PEFT hooks)
from ..methods.branch import SCALE_IN, SCALES, Branch

LORA_A = "lora_A"
LORA_B = "lora_B"


@dataclass(frozen=True)
class Slot:
    """The LoRA branch at one Linear layer of the base."""

    module: str
    in_features: int
    out_features: int
    scales: tuple[str, ...] = ()  # the scale inputs this slot has (``SCALES`` order); () for plain LoRA graphs

    @property
    def input_a(self) -> str:
        return f"{self.module}.{LORA_A}"

    @property
    def input_b(self) -> str:
        return f"{self.module}.{LORA_B}"

    def scale_input(self, kind: str) -> str:
        return f"{self.module}.{kind}"

    def scale_size(self, kind: str) -> int:
        return self.in_features if kind == SCALE_IN else self.out_features

    @property
    def inputs(self) -> list[str]:
        """Every graph input of this slot, in the graph's order."""
        return [self.input_a, self.input_b, *(self.scale_input(kind) for kind in self.scales)]

    def to_dict(self) -> dict:
        out = {"module": self.module, "in_features": self.in_features, "out_features": self.out_features}
        if self.scales:  # absent for plain LoRA slots: their embedding_config.json is as before
            out["scales"] = list(self.scales)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Slot:
        try:
            scales = data.get("scales") or []
            if not isinstance(scales, list) or any(kind not in SCALES for kind in scales):
                raise ValueError(f"scales must be a list of {', '.join(SCALES)}")
            return cls(str(data["module"]), int(data["in_features"]), int(data["out_features"]),
                       tuple(k for k in SCALES if k in scales))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ConfigError(f"Malformed LoRA slot description {data!r}: {err}") from err


SAVED_VALUE = "saved_value"
SAVED_USE = "saved_use"
MAX_SAVED_ELEMENTS = 1 << 22  # per adapter: every adapter file carries a full copy (16 MiB in float32 at most)


@dataclass(frozen=True)
class SavedParam:
    """A parameter of the base that adapters may replace with their own trained copy (``modules_to_save``)."""

    name: str  # relative to the base model, e.g. "encoder.layer.1.output.dense.weight"
    shape: tuple[int, ...]

    @property
    def input_value(self) -> str:
        return f"{self.name}.{SAVED_VALUE}"

    @property
    def input_use(self) -> str:
        return f"{self.name}.{SAVED_USE}"

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: dict) -> SavedParam:
        try:
            shape = tuple(int(d) for d in data["shape"])
            if not shape or min(shape) < 1:
                raise ValueError("shape must be a non-empty list of positive sizes")
            return cls(str(data["name"]), shape)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ConfigError(f"Malformed saved-parameter description {data!r}: {err}") from err


def pack_saved(saved: list[SavedParam], values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An adapter's trained copies {parameter name: array} -> the graph inputs they override; a parameter the
    graph has no input for is refused."""
    by_name = {param.name: param for param in saved}
    arrays = {}
    for name, value in values.items():
        param = by_name.get(name)
        if param is None:
            raise ConfigError(
                f"The adapter trains its own copy of {name!r} (modules_to_save), and this switchable graph has no "
                "input for it (it was exported with no adapter saving that module). Re-export with this adapter "
                "among the --adapter options.")
        if tuple(value.shape) != param.shape:
            raise ConfigError(f"{name}: the trained copy has shape {tuple(value.shape)}, the base {param.shape}")
        arrays[param.input_value] = np.ascontiguousarray(value, dtype=np.float32)
        arrays[param.input_use] = np.ones(1, np.float32)
    return arrays


def check_saved_arrays(saved: list[SavedParam], arrays: dict[str, np.ndarray], where: str) -> None:
    """An adapter's saved copies: each value with its use flag, the base parameter's shape, float32, finite."""
    for param in saved:
        has_value, has_use = param.input_value in arrays, param.input_use in arrays
        if not has_value and not has_use:
            continue
        if has_value != has_use:
            raise ConfigError(f"{where}: {param.input_use if has_value else param.input_value!r} is missing; a "
                              "saved module's copy comes with its saved_use flag")
        for name, expected in ((param.input_value, param.shape), (param.input_use, (1,))):
            value = arrays[name]
            if value.dtype != np.float32:
                raise ConfigError(f"{where}: {name!r} has dtype {value.dtype}, expected float32")
            if value.shape != expected:
                raise ConfigError(f"{where}: {name!r} has shape {value.shape}, expected {expected} (the base "
                                  "parameter's). Was the adapter made for another base?")
            if not np.isfinite(value).all():
                raise ConfigError(f"{where}: {name!r} contains NaN or Inf values")
        if arrays[param.input_use][0] not in (0.0, 1.0):
            raise ConfigError(f"{where}: {param.input_use!r} is {arrays[param.input_use][0]!r}, expected 0 or 1")


def scale_kind(name: str) -> str | None:
    """The scale kind a graph input name ends with, or None."""
    return next((kind for kind in SCALES if name.endswith(f".{kind}")), None)


def is_adapter_input(name: str) -> bool:
    """Whether ``name`` is a per-adapter input of a switchable graph (a LoRA factor or a scale vector)."""
    return (name.endswith((f".{LORA_A}", f".{LORA_B}", f".{SAVED_VALUE}", f".{SAVED_USE}"))
            or scale_kind(name) is not None)


def as_branch(value: Branch | tuple[np.ndarray, np.ndarray]) -> Branch:
    return value if isinstance(value, Branch) else Branch(*value)


def pack_factors(slots: list[Slot], factors: dict[str, Branch | tuple[np.ndarray, np.ndarray]]
                 ) -> dict[str, np.ndarray]:
    """PEFT-layout factors {module: Branch, or (A (r, in), B_scaled (out, r))} -> the graph inputs they override.

    A module without a slot, or a scale the slot has no input for, is refused: the graph cannot run the adapter
    exactly.
    """
    slots_by_module = {slot.module: slot for slot in slots}
    unknown = sorted(set(factors) - set(slots_by_module))
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise ConfigError(
            f"The adapter targets {unknown[0]!r}{more}, which has no LoRA branch in this switchable graph. Re-export "
            "with this adapter among the --adapter options so that the graph gets a branch there."
        )
    arrays: dict[str, np.ndarray] = {}
    for module, value in factors.items():
        slot = slots_by_module[module]
        branch = as_branch(value)
        for kind, scale in branch.scales.items():
            if kind not in slot.scales:
                raise ConfigError(
                    f"The adapter scales {module!r} per channel ({kind}), and this switchable graph has no such input "
                    "there (its graph was exported with no DoRA or IA3 adapter on that layer). Re-export with this "
                    "adapter among the --adapter options so that the graph gets the scale input.")
            if np.shape(scale) != (slot.scale_size(kind),):
                raise ConfigError(f"{module}: {kind} has shape {np.shape(scale)}, expected ({slot.scale_size(kind)},)")
            arrays[slot.scale_input(kind)] = np.ascontiguousarray(scale, dtype=np.float32)
        if branch.a is None:
            continue
        lora_a, lora_b = branch.a, branch.b
        rank = lora_a.shape[0]
        if lora_a.shape != (rank, slot.in_features) or lora_b.shape != (slot.out_features, rank):
            raise ConfigError(
                f"{module}: LoRA weights of shapes {tuple(lora_a.shape)} and {tuple(lora_b.shape)} do not fit the "
                f"graph's layer ({slot.in_features} -> {slot.out_features}); was this adapter trained on another base?"
            )
        arrays[slot.input_a] = np.ascontiguousarray(lora_a.T, dtype=np.float32)
        arrays[slot.input_b] = np.ascontiguousarray(lora_b.T, dtype=np.float32)
    return arrays


def unpack_scales(slots: list[Slot], arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The scale vectors among an adapter's graph inputs, by input name."""
    return {slot.scale_input(k): arrays[slot.scale_input(k)] for slot in slots for k in slot.scales
            if slot.scale_input(k) in arrays}


def unpack_factors(slots: list[Slot], arrays: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Graph inputs -> PEFT-layout factors {module: (A (r, in), B_scaled (out, r))}."""
    return {
        slot.module: (np.ascontiguousarray(arrays[slot.input_a].T), np.ascontiguousarray(arrays[slot.input_b].T))
        for slot in slots
        if slot.input_a in arrays
    }


def check_factor_arrays(slots: list[Slot], arrays: dict[str, np.ndarray], where: str,
                        saved: list[SavedParam] = ()) -> dict[str, int]:
    """Check an adapter's graph inputs (names, pairs, dtype, shapes, values); return {module: rank}.

    Raises ConfigError naming the first bad entry.
    """
    if not arrays:
        raise ConfigError(f"{where} holds no LoRA weights")
    by_input = {name: slot for slot in slots for name in slot.inputs}
    by_input.update((name, param) for param in saved for name in (param.input_value, param.input_use))
    for name in sorted(arrays):
        if name not in by_input:
            raise ConfigError(
                f"{where}: {name!r} is not a LoRA input of this graph. The adapter was made for another base or "
                "targets a layer without a branch here; re-export with it, or add it with `peft-export add-adapter`."
            )
    check_saved_arrays(list(saved), arrays, where)
    ranks = {}
    for slot in slots:
        for kind in slot.scales:
            name = slot.scale_input(kind)
            value = arrays.get(name)
            if value is None:
                continue  # ones: the adapter leaves this scale alone
            if value.dtype != np.float32:
                raise ConfigError(f"{where}: {name!r} has dtype {value.dtype}, expected float32")
            if value.shape != (slot.scale_size(kind),):
                raise ConfigError(f"{where}: {name!r} has shape {value.shape}, expected ({slot.scale_size(kind)},): "
                                  "one value per channel of the layer. Was the adapter made for another base?")
            if not np.isfinite(value).all():
                raise ConfigError(f"{where}: {name!r} contains NaN or Inf values")
        has_a, has_b = slot.input_a in arrays, slot.input_b in arrays
        if not has_a and not has_b:
            continue
        if has_a != has_b:
            raise ConfigError(f"{where}: {slot.input_b if has_a else slot.input_a!r} is missing; LoRA weights come "
                              "in A/B pairs")
        lora_a, lora_b = arrays[slot.input_a], arrays[slot.input_b]
        for name, value in ((slot.input_a, lora_a), (slot.input_b, lora_b)):
            if value.dtype != np.float32:
                raise ConfigError(f"{where}: {name!r} has dtype {value.dtype}, expected float32")
            if value.ndim != 2:
                raise ConfigError(f"{where}: {name!r} has shape {value.shape}, expected a matrix")
            if not np.isfinite(value).all():
                raise ConfigError(f"{where}: {name!r} contains NaN or Inf values")
        rank = lora_a.shape[1]
        if lora_a.shape[0] != slot.in_features or lora_b.shape != (rank, slot.out_features) or rank > MAX_RANK:
            raise ConfigError(
                f"{where}: {slot.module!r} has A {lora_a.shape} and B {lora_b.shape}; this graph expects A "
                f"({slot.in_features}, r) and B (r, {slot.out_features}) with r <= {MAX_RANK}. Was the adapter made "
                "for another base?"
            )
        ranks[slot.module] = rank
    return ranks
