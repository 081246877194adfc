"""FRoD (``peft_type: FROD``): each targeted weight rewritten as ``U (S + diag(lambda_l)) V^T`` with ``V`` (in, in) a
projection shared by the modules of one role across blocks (``base_model.frod_V.<role>``, e.g. ``self_query``), a
sparse ``S`` at fixed shared positions (``frod_s_indices.<role>``, integers, size ``frod_s_size.<role>``) holding
trained ``frod_lambda_s_values``, and ``U`` recomputed by PEFT from the base weight at load; merged by PEFT into the
base weights. Where ``save_projection`` is False PEFT regenerates the shared tensors from the base weights."""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable

from ..errors import ConfigError
from .base import (AdapterConfig, BaseLayer, Capability, TensorInfo, TensorKey, check_number, check_target_modules,
                   is_unused_head, tensor_pattern)
from .tuner import TunerMethod

SHARED = re.compile(r"^(?:base_model\.)?(?P<name>frod_(?P<kind>V|s_indices|s_size)\.(?P<role>[^.]+))$")


def role_of(module: str) -> str:
    """PEFT's sharing role of a module: its last two name parts (BERT's attention output kept apart)."""
    parts = module.split(".")
    if len(parts) == 1:
        return parts[0]
    if parts[-2].isdigit():
        return parts[-1]
    role = f"{parts[-2]}_{parts[-1]}"
    return "attention_output" if role == "output_dense" and len(parts) >= 3 and parts[-3] == "attention" else role


def sparse_count(size: int, rate: float) -> int:
    """How many off-diagonal positions of a (size, size) S PEFT trains."""
    off_diagonal = size * (size - 1)
    count = min(int(size * size * rate), off_diagonal)
    return max(1, count) if rate > 0 and off_diagonal > 0 else count


class Frod(TunerMethod):
    peft_type = "FROD"
    name = "FRoD"
    switchable = Capability(False, "it rewrites the whole weight through a shared projection, not a low-rank "
                                   "branch")
    key_pattern = tensor_pattern("frod_lambda_l", "frod_lambda_s_values")
    required_parts = ("frod_lambda_l", "frod_lambda_s_values")
    peft_classes = ("FrodConfig", "peft.tuners.frod", "FrodLayer")
    summary_fields = ("sparse_rate", "save_projection", "projection_prng_key", "target_modules", "modules_to_save")

    def check_config(self, raw: dict[str, Any], where: str) -> None:
        check_number(raw, where, "sparse_rate", 0.01, minimum=0, maximum=1)
        check_target_modules(raw, where)

    def describe(self, config: AdapterConfig) -> str:
        return f"sparse_rate={config.raw.get('sparse_rate', 0.01)} targets={config.target_modules}"

    def expected_shape(self, config: AdapterConfig, key: TensorKey, layer: BaseLayer) -> tuple[int | None, ...]:
        size = layer.in_features
        if key.part == "frod_lambda_l":
            return (size,)
        return (sparse_count(size, float(config.raw.get("sparse_rate", 0.01))),)

    def _is_index_key(self, key: str) -> bool:
        match = SHARED.match(key)
        return match is not None and match.group("kind") != "V"

    def shared_tensor(self, key: str) -> str | None:
        match = SHARED.match(key)
        return match.group("name") if match else None

    def check_tensors(self, config: AdapterConfig, where: Any, keys: list[str], read: Callable[[str], TensorInfo],
                      layers: dict[str, BaseLayer], base_name: str, targeted: Callable[[], Iterable[str]],
                      params: dict[str, tuple[int, ...]] | None = None) -> None:
        """Also: where the projection is saved, each role of the targeted modules has its V (in, in), its positions
        (2, n) inside it and its size (in, in), and no other role is saved."""
        modules: list[str] = []

        def remember() -> list[str]:
            modules.extend(targeted())
            return modules

        super().check_tensors(config, where, keys, read, layers, base_name, remember, params)
        shared = {name: key for key in keys if (name := self.shared_tensor(key)) is not None}
        if not config.raw.get("save_projection", True):
            if shared:
                raise ConfigError(f"{where}: tensor {sorted(shared.values())[0]!r} is saved but adapter_config.json "
                                  "sets save_projection false, so PEFT would regenerate it; the config and the "
                                  "weights disagree (was the config edited?)")
            return
        sizes: dict[str, int] = {}
        for module in modules:
            layer = layers.get(module)
            if layer is not None and layer.is_linear and not is_unused_head(module):
                sizes[role_of(module)] = layer.in_features
        rate = float(config.raw.get("sparse_rate", 0.01))
        wanted = {f"frod_{kind}.{role}": shape for role, size in sizes.items() for kind, shape in (
            ("V", (size, size)), ("s_indices", (2, sparse_count(size, rate))), ("s_size", (2,)))}
        for name in sorted(set(wanted) | set(shared)):
            if name not in shared:
                raise ConfigError(f"{where}: tensor base_model.{name} is missing: the {self.name} modules of role "
                                  f"{name.split('.', 1)[1]!r} share it. The file is incomplete; save the adapter "
                                  "again.")
            key = shared[name]
            if name not in wanted:
                raise ConfigError(f"{where}: tensor {key!r} belongs to no targeted role ({', '.join(sorted(sizes))}); "
                                  "was this adapter trained on another base, or the config edited?")
            info = read(key)
            if tuple(info.shape) != wanted[name]:
                raise ConfigError(f"{where}: {key!r} has shape {tuple(info.shape)}, expected {wanted[name]} for the "
                                  "base layers of its role and sparse_rate; was this adapter trained on another base?")
            size = sizes[name.split(".", 1)[1]]
            bounds = (0, size - 1) if "s_indices" in name else (size, size)
            for low, high in info.row_ranges or ():
                if (name.startswith("frod_s_size") and (low, high) != bounds) or low < bounds[0] or high > bounds[1]:
                    what = "positions" if "s_indices" in name else "a size"
                    raise ConfigError(f"{where}: tensor {key!r} holds {what} {low}..{high}, expected "
                                      f"{'within ' if 's_indices' in name else ''}{bounds[0]}..{bounds[1]} for base "
                                      f"layers of {size} inputs; the file is corrupt or was made for another base")


FROD = Frod()
