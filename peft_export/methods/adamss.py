"""AdaMSS (``peft_type: ADAMSS``): the base weight (with its bias as an extra column) projected on its top ``R``
principal directions (``adamss_newB`` (R, in + 1), saved), its output rows clustered into at most
``num_subspaces`` subspaces (PEFT recomputes the clusters from the base weight at load), and each subspace ``k``
updated by a trained pair ``adamss_B.k`` (rows of subspace k, rank) and ``adamss_A.k`` (rank, R); merged by PEFT into
the base weights."""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable

from ..errors import ConfigError
from .base import (MAX_RANK, AdapterConfig, BaseLayer, Capability, TensorInfo, TensorKey, check_number,
                   check_target_modules)
from .tuner import TunerMethod


class Adamss(TunerMethod):
    peft_type = "ADAMSS"
    name = "AdaMSS"
    switchable = Capability(False, "its subspaces are clustered from the base weight at load, not yet laid out as "
                                   "a switchable graph's low-rank factors")
    key_pattern = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>adamss_newB|adamss_[AB]\.\d+)$")
    required_parts = ("adamss_newB", "adamss_A.0", "adamss_B.0")
    peft_classes = ("AdamssConfig", "peft.tuners.adamss", "AdamssLayer")
    summary_fields = ("r", "num_subspaces", "subspace_rank", "use_dynamic_rank", "random_seed", "target_modules",
                      "modules_to_save")

    def check_config(self, raw: dict[str, Any], where: str) -> None:
        check_number(raw, where, "r", 100, integer=True, minimum=1, maximum=MAX_RANK)
        check_number(raw, where, "num_subspaces", 5, integer=True, minimum=1, maximum=MAX_RANK)
        check_number(raw, where, "subspace_rank", 1, integer=True, minimum=1, maximum=MAX_RANK)
        check_target_modules(raw, where)

    def describe(self, config: AdapterConfig) -> str:
        raw = config.raw
        return (f"r={raw.get('r')} subspaces={raw.get('num_subspaces')} rank={raw.get('subspace_rank')} "
                f"targets={config.target_modules}")

    def check_tensor_shape(self, config: AdapterConfig, where: Any, key: TensorKey, shape: tuple[int, ...],
                           layer: BaseLayer) -> None:
        subspaces, rank = int(config.raw.get("num_subspaces", 5)), int(config.raw.get("subspace_rank", 1))
        if "." in key.part and int(key.part.rsplit(".", 1)[1]) >= subspaces:
            raise ConfigError(f"{where}: tensor {key.key!r} is a subspace beyond 'num_subspaces' ({subspaces}) in "
                              "adapter_config.json; the config and the weights disagree (was the config edited?)")
        super().check_tensor_shape(config, where, key, shape, layer)
        ranks = shape[:1] if key.part.startswith("adamss_A") else shape[1:] if key.part.startswith("adamss_B") else ()
        if any(not 1 <= r <= rank for r in ranks):
            raise ConfigError(f"{where}: {key.key!r} has shape {tuple(shape)}: its rank {ranks[0]} is outside "
                              f"1..subspace_rank ({rank}); was this adapter trained with another config?")

    def expected_shape(self, config: AdapterConfig, key: TensorKey, layer: BaseLayer) -> tuple[int | None, ...]:
        columns = layer.in_features + (1 if layer.has_bias else 0)  # the bias is PCA'd as an extra column
        kept = min(int(config.raw.get("r", 100)), layer.out_features, columns)
        if key.part == "adamss_newB":
            return (kept, columns)
        return (None, kept) if key.part.startswith("adamss_A") else (None, None)

    def check_tensors(self, config: AdapterConfig, where: Any, keys: list[str], read: Callable[[str], TensorInfo],
                      layers: dict[str, BaseLayer], base_name: str, targeted: Callable[[], Iterable[str]],
                      params: dict[str, tuple[int, ...]] | None = None) -> None:
        """Also: each module's subspaces are numbered 0..K-1 with an A and a B each, and their B rows together
        cover the layer's outputs once (the clusters partition them)."""
        super().check_tensors(config, where, keys, read, layers, base_name, targeted, params)
        found: dict[str, dict[str, dict[int, str]]] = {}
        for key in keys:
            match = self.key_pattern.match(key)
            if match is not None and "." in match.group("part"):
                side, index = match.group("part").split(".")
                found.setdefault(match.group("module"), {}).setdefault(side, {})[int(index)] = key
        for module, sides in sorted(found.items()):
            layer = layers.get(module)
            if layer is None or not layer.is_linear:
                continue
            count = max(max(s) for s in sides.values()) + 1
            for side in ("adamss_A", "adamss_B"):
                missing = [i for i in range(count) if i not in sides.get(side, {})]
                if missing:
                    raise ConfigError(f"{where}: tensor {side}.{missing[0]} of {module!r} is missing: the file has "
                                      f"subspaces 0..{count - 1} for it, each needs adamss_A and adamss_B. The file is "
                                      "incomplete; save the adapter again.")
            rows = sum(read(key).shape[0] for key in sides["adamss_B"].values())
            if rows != layer.out_features:
                raise ConfigError(f"{where}: the adamss_B tensors of {module!r} cover {rows} output rows, expected "
                                  f"{layer.out_features} (weight {layer.weight_shape}): its subspaces partition the "
                                  "outputs; was this adapter trained on another base?")


ADAMSS = Adamss()
