"""OSF (``peft_type: OSF``): the base weight's SVD split in two, its top ``effective_rank`` directions frozen (PEFT
recomputes them from the base weight at load) and the rest trained (``U_low`` (out, m), ``S_low`` (m,), ``V_low``
(m, in), ``m = min(out, in) - effective_rank``, saved with the adapter); merged by PEFT into the base weights."""

from __future__ import annotations

import re
from typing import Any

from ..errors import ConfigError
from .base import AdapterConfig, BaseLayer, Capability, TensorKey, check_target_modules
from .tuner import TunerMethod

PARTS = ("osf_svd_params.U_low", "osf_svd_params.S_low", "osf_svd_params.V_low")


def _is_rank(value: Any) -> bool:
    return value is None or (not isinstance(value, bool) and isinstance(value, (int, float)) and value > 0)


def _resolve(value: Any, min_dim: int) -> int:
    """PEFT's effective rank for a weight whose smaller side is ``min_dim``: half of it by default, a float in (0, 1]
    as a fraction of it, anything else as an absolute rank, clipped to ``0..min_dim``."""
    if value is None:
        return max(min_dim // 2, 0)
    rank = int(min_dim * value) if isinstance(value, float) and 0 < value <= 1 else int(value)
    return max(min(min_dim, rank), 0)


class Osf(TunerMethod):
    peft_type = "OSF"
    name = "OSF"
    switchable = Capability(False, "it replaces part of the base weight's SVD, which a switchable graph's additive "
                                   "branch cannot undo")
    key_pattern = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>osf_svd_params\.[USV]_low)$")
    required_parts = PARTS
    peft_classes = ("OSFConfig", "peft.tuners.osf", "OSFLayer")
    summary_fields = ("effective_rank", "rank_pattern", "target_modules", "modules_to_save")

    def check_config(self, raw: dict[str, Any], where: str) -> None:
        if not _is_rank(raw.get("effective_rank")):
            raise ConfigError(f"{where}: 'effective_rank' must be null, a positive integer or a fraction in (0, 1], "
                              f"found {raw.get('effective_rank')!r}")
        pattern = raw.get("rank_pattern") or {}
        if not isinstance(pattern, dict) or not all(isinstance(k, str) and _is_rank(v) and v is not None
                                                    for k, v in pattern.items()):
            raise ConfigError(f"{where}: 'rank_pattern' must map module patterns to positive ranks or fractions, "
                              f"found {pattern!r}")
        check_target_modules(raw, where)

    def describe(self, config: AdapterConfig) -> str:
        return f"effective_rank={config.raw.get('effective_rank')} targets={config.target_modules}"

    def trained_rank(self, config: AdapterConfig, module: str, layer: BaseLayer) -> int:
        """``m``: the directions of ``module``'s weight OSF trains (rank_pattern's first search match, PEFT's rule)."""
        min_dim = min(layer.weight_shape)
        value = config.raw.get("effective_rank")
        for pattern, rank in (config.raw.get("rank_pattern") or {}).items():
            if re.search(pattern, module):
                value = rank
                break
        return min_dim - _resolve(value, min_dim)

    def expected_shape(self, config: AdapterConfig, key: TensorKey, layer: BaseLayer) -> tuple[int | None, ...]:
        m = self.trained_rank(config, key.module, layer)
        return {"osf_svd_params.U_low": (layer.out_features, m), "osf_svd_params.S_low": (m,),
                "osf_svd_params.V_low": (m, layer.in_features)}[key.part]


OSF = Osf()
