"""What a PEFT method module declares: its config fields, its tensors and their checks, and the export modes it
supports (merged, switchable) with the reason where it does not.

Torch-free at import: the torch-side hooks (the PEFT config and layer classes, the switchable branch factors)
import PEFT inside the function, and run only where torch is already loaded (export/).
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable

from ..errors import ConfigError
from .saved_modules import SAVED_MODULE_KEY, check_saved_complete, check_saved_tensor, saved_module_of

MAX_RANK = 4096  # a sanity bound against absurd adapter configs and weight files (configs, runtime adapter files)

# Heads whose output no sentence embedding reads (pooling uses last_hidden_state). An adapter on them
# (target_modules=["dense"] also hits BERT's pooler.dense) has no effect on the embeddings, so if the base checkpoint
# has no such head their tensors are skipped instead of being reported as modules the base lacks, and switchable
# graphs give them no branch.
UNUSED_HEADS = ("pooler",)

# How to export an adapter merged instead: (to a library caller, on the command line).
EXPORT_MERGED = "(export_onnx_model without switchable=True)", "(merge-onnx without --switchable)"


def is_unused_head(module: str) -> bool:
    return module.split(".", 1)[0] in UNUSED_HEADS


@dataclass(frozen=True)
class Capability:
    """Whether a method can be exported in one mode, and why not where it cannot."""

    supported: bool
    reason: str = ""


@dataclass(frozen=True)
class RefusedOption:
    """A config key whose truthy value a method cannot export exactly: everywhere, or only in switchable exports
    (``why`` is then part of the message). ``message``, where given, replaces the general message; it is formatted
    with ``where``, ``value`` and ``method`` (the method's name)."""

    key: str
    why: str = ""
    switchable_only: bool = False
    message: str | None = None


# PEFT-wide: trained full copies of modules (``modules_to_save``), in any tuner's config: merged exports take them
# (PEFT's merge_and_unload puts the trained copy in place of the module), switchable exports give each saved
# parameter graph inputs where it is small (runtime/lora_layout.py: SavedParam); methods/saved_modules.py checks them.


def tensor_pattern(*parts: str) -> re.Pattern:
    """The key pattern of a method whose tensors PEFT saves as ``[base_model.model.]<module>.<part>[.weight]``."""
    return re.compile(rf"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>{'|'.join(parts)})(?:\.weight)?$")


def check_number(raw: dict[str, Any], where: str, key: str, default: Any, *, integer: bool = False,
                 minimum: float | None = None, maximum: float | None = None) -> None:
    """Raise ConfigError naming ``key`` unless its value (``default`` when absent) is a finite number (an integer
    where ``integer``) within [minimum, maximum]."""
    value = raw.get(key, default)
    kind = "an integer" if integer else "a finite number"
    ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float)) and math.isfinite(value)
    ok = ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        bounds = (f" in {minimum:g}..{maximum:g}" if minimum is not None and maximum is not None
                  else f" >= {minimum:g}" if minimum is not None else "")
        raise ConfigError(f"{where}: {key!r} must be {kind}{bounds}, found {value!r}")


def refuse_options(raw: dict[str, Any], where: str, options: Iterable[RefusedOption], method: str,
                   switchable: bool) -> None:
    """The one place refused config keys are turned into errors: the options refused everywhere when
    ``switchable`` is False (config parsing), the switchable-only ones when it is True."""
    for option in options:
        value = raw.get(option.key)
        if not value or option.switchable_only != switchable:
            continue
        if option.message is not None:
            raise ConfigError(option.message.format(where=where, value=value, method=method))
        if not switchable:
            raise ConfigError(f"{where}: {option.key!r} is set ({value!r}); peft_export cannot export it exactly")
        found = (f"{where}: {option.key!r} is set ({value!r}); a switchable export cannot reproduce it exactly "
                 f"({option.why}). Export this adapter merged instead")
        raise_export_merged(found)


def raise_export_merged(found: str) -> None:
    """Raise ``found`` followed by how to export merged instead, in library and command-line words."""
    raise ConfigError(f"{found} {EXPORT_MERGED[0]}.").in_cli_words(f"{found} {EXPORT_MERGED[1]}.")


def check_target_modules(raw: dict[str, Any], where: str) -> None:
    targets = raw.get("target_modules")
    if not targets or not isinstance(targets, (str, list)) or (
        isinstance(targets, list) and not all(isinstance(t, str) and t for t in targets)
    ):
        raise ConfigError(f"{where}: 'target_modules' must be a non-empty list of module names or a regex string")


@dataclass
class AdapterConfig:
    """A checked adapter_config.json and the method that parsed it; methods subclass it for their own fields."""

    raw: dict[str, Any]
    method: PeftMethod = field(repr=False, compare=False)

    @property
    def peft_type(self) -> str:
        return self.method.peft_type

    @property
    def base_model_name_or_path(self) -> str | None:
        return self.raw.get("base_model_name_or_path")

    @property
    def target_modules(self) -> list[str] | str:
        return self.raw.get("target_modules") or []

    def summary(self) -> dict[str, Any]:
        """What the manifest records about the adapter's config."""
        return self.method.summary(self)

    def describe(self) -> str:
        """One line for the export log."""
        return self.method.describe(self)


@dataclass(frozen=True)
class TensorKey:
    """One tensor name of an adapter file, split: ``{prefix}{module}.{part}...``."""

    key: str
    module: str
    part: str
    prefix: str


@dataclass(frozen=True)
class TensorInfo:
    """What the checks need of one tensor, read by whichever framework opened the file."""

    shape: tuple[int, ...]
    dtype: str  # as that framework names it
    is_float: bool
    finite: bool  # no NaN/Inf (True for non-float tensors)
    # Integer tensors: (min, max) of each row along the first axis (SHiRA's indices: row 0 out, row 1 in), else None.
    row_ranges: tuple[tuple[int, int], ...] | None = None


@dataclass(frozen=True)
class BaseLayer:
    """What the checks need of one module of the base model."""

    type_name: str
    is_linear: bool
    weight_shape: tuple[int, ...] | None  # (out, in) for a Linear
    has_bias: bool = False  # GLoRA's bias paths exist only on layers with a bias

    @property
    def in_features(self) -> int:
        return self.weight_shape[1]

    @property
    def out_features(self) -> int:
        return self.weight_shape[0]


class PeftMethod(ABC):
    """One PEFT method (tuner). Subclass it in ``peft_export/methods/<method>.py`` and register an instance in
    ``registry.py``; docs/peft-methods.md says what else to add."""

    peft_type: ClassVar[str]  # PEFT's PeftType value in adapter_config.json, e.g. "LORA"
    name: ClassVar[str]  # for messages and help, e.g. "LoRA"
    merged: ClassVar[Capability] = Capability(True)
    switchable: ClassVar[Capability] = Capability(False, "it has no low-rank branch a switchable graph can run")
    refused_options: ClassVar[tuple[RefusedOption, ...]] = ()
    config_class: ClassVar[type[AdapterConfig]] = AdapterConfig
    key_pattern: ClassVar[re.Pattern]  # adapter file keys; named groups "module" and "part"
    required_parts: ClassVar[tuple[str, ...]]  # the parts every targeted module must have in the file
    # A required part PEFT may save in another form instead (LoKr: lokr_w1, or lokr_w1_a and lokr_w1_b).
    alternative_parts: ClassVar[dict[str, tuple[str, ...]]] = {}
    # Tensors kept once for every layer (``base_model.<name>``) that a config with ``save_projection`` must carry
    # (VeRA's projections), and how messages call them.
    saved_projections: ClassVar[tuple[str, ...]] = ()
    saved_projections_are: ClassVar[str] = "shared projections"
    extras_refused: ClassVar[str] = ""  # appended to "is not a <name> weight" when tensors are checked
    layer_kinds: ClassVar[str] = "Linear layers"  # what supports_layer accepts, for messages
    saved_as_weight: ClassVar[bool] = True  # PEFT saves a part as "<module>.<part>.weight" (a submodule's weight)
    index_parts: ClassVar[tuple[str, ...]] = ()  # integer parts (SHiRA's indices), checked by check_indices

    # ---- adapter_config.json

    def parse_config(self, raw: dict[str, Any], where: str) -> AdapterConfig:
        """Check the method's fields, refuse the options it cannot export, and return its config object."""
        self.check_config(raw, where)
        saved = raw.get("modules_to_save")
        if saved is not None and not (isinstance(saved, list) and all(isinstance(m, str) and m for m in saved)):
            raise ConfigError(f"{where}: 'modules_to_save' must be a list of module names, found {saved!r}")
        refuse_options(raw, where, self.refused_options, self.name, switchable=False)
        return self.config_class(raw, self)

    @abstractmethod
    def check_config(self, raw: dict[str, Any], where: str) -> None:
        """Raise ConfigError naming the first missing or invalid field of this method."""

    @abstractmethod
    def summary(self, config: AdapterConfig) -> dict[str, Any]:
        """The manifest's fields for this adapter's config."""

    def describe(self, config: AdapterConfig) -> str:
        return f"targets={config.target_modules}"

    def nonfinite_hint(self, config: AdapterConfig, config_path: Any) -> str:
        """Appended to "Adapter 'x' produces non-finite values": which config values may overflow."""
        return f": check its weights and {config_path}"

    # ---- export modes

    def check_mergeable(self, config: AdapterConfig, where: str) -> None:
        if not self.merged.supported:
            raise ConfigError(f"{where}: {self.name} adapters (peft_type {self.peft_type!r}) cannot be exported "
                              f"merged: {self.merged.reason}")

    def check_switchable(self, config: AdapterConfig, where: str) -> None:
        """Refuse what a switchable graph cannot reproduce exactly, naming the key."""
        if not self.switchable.supported:
            raise_export_merged(f"{where}: {self.name} adapters (peft_type {self.peft_type!r}) cannot be exported "
                                f"switchable: {self.switchable.reason}. Export this adapter merged instead")
        refuse_options(config.raw, where, self.refused_options, self.name, switchable=True)
        bias = config.raw.get("bias", "none")  # LoRA, VeRA, AdaLoRA, ...: "all" or "<method>_only" train biases
        if bias not in (None, "none"):
            raise_export_merged(f"{where}: 'bias' is {bias!r}: the adapter trains the base layers' biases, which a "
                                "switchable export shares between adapters. Export it merged instead")

    # ---- adapter tensors

    def parse_key(self, key: str, where: Any, explain: bool = True) -> TensorKey:
        match = self.key_pattern.match(key)
        if match is None:
            found = f"{where}: tensor {key!r} is not a {self.name} weight ({'/'.join(self.required_parts)})"
            raise ConfigError(f"{found}; {self.extras_refused}" if explain and self.extras_refused else found)
        return TensorKey(key, match.group("module"), match.group("part"), key[: match.start("module")])

    def tensor_name(self, prefix: str, module: str, part: str) -> str:
        """The key PEFT saves ``part`` of ``module`` under."""
        return f"{prefix}{module}.{part}" + (".weight" if self.saved_as_weight else "")

    def required_parts_for(self, config: AdapterConfig) -> tuple[str, ...]:
        """The parts every targeted module must have, for this config (LoRA: DoRA adds its magnitude)."""
        return self.required_parts

    def supports_layer(self, layer: BaseLayer) -> bool:
        return layer.is_linear

    def expected_shape(self, config: AdapterConfig, key: TensorKey, layer: BaseLayer) -> tuple[int | None, ...]:
        """The shape ``key``'s tensor must have on ``layer`` (None: any size on that axis). Methods that use the
        default check_tensor_shape implement it."""
        raise NotImplementedError(f"{self.name} does not declare its tensor shapes")

    def check_tensor_shape(self, config: AdapterConfig, where: Any, key: TensorKey, shape: tuple[int, ...],
                           layer: BaseLayer) -> None:
        """Raise ConfigError if ``shape`` does not fit ``layer`` (the base module) and the config's sizes."""
        if not self.supports_layer(layer):
            raise ConfigError(f"{where}: {key.key!r} targets a {layer.type_name}; {self.name} is exported on "
                              f"{self.layer_kinds} only")
        expected = self.expected_shape(config, key, layer)
        if len(shape) != len(expected) or any(e is not None and e != s for e, s in zip(expected, shape)):
            wanted = "(" + ", ".join("any" if e is None else str(e) for e in expected) + ")"
            raise ConfigError(
                f"{where}: {key.key!r} has shape {tuple(shape)}, expected {wanted} for the base layer {key.module!r} "
                f"(weight {layer.weight_shape}) and adapter_config.json; was this adapter trained on another base, "
                "or the config edited?")

    def check_tensors(self, config: AdapterConfig, where: Any, keys: list[str], read: Callable[[str], TensorInfo],
                      layers: dict[str, BaseLayer], base_name: str, targeted: Callable[[], Iterable[str]],
                      params: dict[str, tuple[int, ...]] | None = None) -> None:
        """Refuse adapter tensors that are non-float, non-finite, mis-shaped, or aimed at modules the base lacks
        (``layers``: every module of the base by name), and files missing a part of a module the config targets
        (``targeted``, called once the tensors passed). ``read`` gives one tensor's facts, by key. ``params`` (every
        parameter of the base by name, with its shape) checks the trained copies of ``modules_to_save``."""
        if not keys:
            raise ConfigError(f"{where} holds no tensors")
        saved_entries = config.raw.get("modules_to_save") or []
        found: dict[str, set[str]] = {}
        saved: dict[str, set[str]] = {}
        shared: set[str] = set()
        prefix = ""
        for key in keys:
            info = read(key)
            index = self._is_index_key(key)
            if info.is_float == index:
                wanted = "an integer type (indices)" if index else "a float type"
                raise ConfigError(f"{where}: tensor {key!r} has dtype {info.dtype}, expected {wanted}")
            if not info.finite:
                raise ConfigError(f"{where}: tensor {key!r} contains NaN or Inf values")
            if (name := self.shared_tensor(key)) is not None:
                self.check_shared_tensor(config, where, key, name, info.shape)
                shared.add(name)
                continue
            module = self.saved_copy_module(config, key)
            if module is not None:
                param = SAVED_MODULE_KEY.match(key).group("param")
                check_saved_tensor(where, key, param, info.shape, params or {}, base_name)
                saved.setdefault(module, set()).add(param)
                continue
            parsed = self.parse_key(key, where)
            layer = layers.get(parsed.module)
            if layer is None and not is_unused_head(parsed.module):
                raise ConfigError(
                    f"{where}: tensor {key!r} targets module {parsed.module!r}, which the base model "
                    f"({base_name}) does not have; was this adapter trained on another base?"
                )
            if layer is not None:  # None: e.g. BERT's pooler absent from this checkpoint; its output is never used
                self.check_tensor_shape(config, where, parsed, info.shape, layer)
                if index:
                    self.check_indices(config, where, parsed, info, layer)
            prefix = parsed.prefix
            found.setdefault(parsed.module, set()).add(parsed.part)
        self.check_shared_complete(config, where, shared)
        if saved_entries and params is not None:
            check_saved_complete(saved_entries, where, saved, params, prefix or "base_model.model.")
        self.check_complete(config, where, found, targeted(), prefix)

    def saved_copy_module(self, config: AdapterConfig, key: str) -> str | None:
        """The module of ``modules_to_save`` whose trained copy tensor ``key`` holds (PEFT saves a copy under the base
        parameter's own name: ``base_model.model.classifier.weight``), or None for the method's own tensors."""
        entries = config.raw.get("modules_to_save") or []
        if not entries or self.key_pattern.match(key) is not None:
            return None
        return saved_module_of(SAVED_MODULE_KEY.match(key).group("param"), entries)

    def _is_index_key(self, key: str) -> bool:
        match = self.key_pattern.match(key) if self.index_parts else None
        return match is not None and match.group("part") in self.index_parts

    def check_indices(self, config: AdapterConfig, where: Any, key: TensorKey, info: TensorInfo,
                      layer: BaseLayer) -> None:
        """Raise ConfigError if an integer part (``index_parts``) points outside ``layer``'s weight."""
        raise NotImplementedError(f"{self.name} declares index parts but does not check them")

    def shared_tensor(self, key: str) -> str | None:
        """The name of ``key`` if it is a tensor the method keeps once for every layer (VeRA's projections), else
        None (the default: every tensor belongs to one module)."""
        return None

    def check_shared_tensor(self, config: AdapterConfig, where: Any, key: str, name: str,
                            shape: tuple[int, ...]) -> None:
        """Raise ConfigError if a shared tensor's shape does not fit the config."""

    def check_shared_complete(self, config: AdapterConfig, where: Any, found: set[str]) -> None:
        """Raise ConfigError if a shared tensor the config needs is missing from the file: by default the
        ``saved_projections`` a config with ``save_projection`` (PEFT's default) must carry."""
        if self.saved_projections and config.raw.get("save_projection", True):
            for name in self.saved_projections:
                if name not in found:
                    raise ConfigError(
                        f"{where}: tensor base_model.{name} is missing: adapter_config.json sets save_projection, "
                        f"so the {self.saved_projections_are} must be in the file. The file is incomplete; save the "
                        "adapter again.")

    def check_complete(self, config: AdapterConfig, where: Any, found: dict[str, set[str]], targeted: Iterable[str],
                       prefix: str) -> None:
        """Every module the config's target_modules match must have every required part in the file (or a required
        part's alternative form, all of it)."""
        required = self.required_parts_for(config)
        parts = "/".join(required)
        group = "pair" if len(required) == 2 else "set"
        for module in sorted(set(targeted) | set(found)):
            if is_unused_head(module):
                continue  # never read by a sentence embedding
            have = found.get(module, set())
            for part in required:
                alternative = self.alternative_parts.get(part)
                if part in have or (alternative and set(alternative) <= have):
                    continue
                raise ConfigError(
                    f"{where}: tensor {self.tensor_name(prefix, module, part)} is missing: target_modules "
                    f"{config.target_modules!r} put a {self.name} on {module!r}, but the file has no complete "
                    f"{parts} {group} for it. The file is incomplete or belongs to another adapter; save the "
                    "adapter again."
                )

    # ---- torch side (PEFT imported inside; called only from export/)

    @abstractmethod
    def peft_config_class(self) -> type:
        """PEFT's config class of this method (to match target_modules by PEFT's own rule)."""

    @abstractmethod
    def peft_layers(self, model: Any, adapter_name: str) -> list[tuple[str, Any]]:
        """(name, module) of every PEFT layer of this method in ``model`` that holds ``adapter_name``."""

    def branch_factors(self, module: Any, adapter_name: str, layer_name: str) -> Any:
        """Switchable methods: a ``methods.branch.Branch`` (low-rank factors A (r, in), B with the scaling folded
        in (out, r), and scale vectors) as float32 numpy arrays, exactly what the PEFT layer ``module`` does for
        ``adapter_name`` (the graph's arithmetic is in branch.py's docstring)."""
        raise NotImplementedError(f"{self.name} has no switchable branch: {self.switchable.reason}")

    def branch_needs_base_weights(self, config: AdapterConfig) -> bool:
        """Whether ``branch_factors`` reads the base layer's weights (DoRA's norm), so that an adapter cannot be
        converted for a switchable graph without the base model."""
        return False
