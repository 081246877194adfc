"""FourierFT (``peft_type: FOURIERFT``): ``W + scaling * IDFT(spectrum at fixed random frequencies)``; merged by
PEFT into the base weights."""

from __future__ import annotations

from typing import Any

from .base import (AdapterConfig, BaseLayer, Capability, TensorKey, check_number,
                   check_target_modules, tensor_pattern)
from .tuner import TunerMethod


class FourierFt(TunerMethod):
    peft_type = "FOURIERFT"
    name = "FourierFT"
    switchable = Capability(False, "its update is a dense inverse Fourier transform, not a low-rank branch")
    key_pattern = tensor_pattern("fourierft_spectrum")
    required_parts = ("fourierft_spectrum",)
    peft_classes = ("FourierFTConfig", "peft.tuners.fourierft", "FourierFTLayer")
    summary_fields = ("n_frequency", "scaling", "random_loc_seed", "target_modules", "modules_to_save")

    def check_config(self, raw: dict[str, Any], where: str) -> None:
        check_number(raw, where, "n_frequency", 1000, integer=True, minimum=1)
        check_number(raw, where, "scaling", 150.0)
        check_target_modules(raw, where)

    def describe(self, config: AdapterConfig) -> str:
        return f"n_frequency={config.raw.get('n_frequency')} targets={config.target_modules}"

    def expected_shape(self, config: AdapterConfig, key: TensorKey, layer: BaseLayer) -> tuple[int | None, ...]:
        pattern = config.raw.get("n_frequency_pattern") or {}
        from peft.utils.other import get_pattern_key  # only called where PEFT is loaded (export/)

        matched = get_pattern_key(list(pattern), key.module)
        return (int(pattern.get(matched, config.raw.get("n_frequency", 1000))),)


FOURIERFT = FourierFt()
