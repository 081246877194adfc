"""WaveFT (``peft_type: WAVEFT``): ``W + scaling * IDWT(coefficients at fixed random positions)`` (a sparse
update in a wavelet basis); merged by PEFT into the base weights."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .base import AdapterConfig, BaseLayer, Capability, TensorKey, check_number, check_target_modules, tensor_pattern
from .tuner import TunerMethod


class WaveFt(TunerMethod):
    peft_type = "WAVEFT"
    name = "WaveFT"
    switchable = Capability(False, "its update is a dense inverse wavelet transform, not a low-rank branch")
    key_pattern = tensor_pattern("waveft_spectrum")
    required_parts = ("waveft_spectrum",)
    peft_classes = ("WaveFTConfig", "peft.tuners.waveft", "WaveFTLayer")
    summary_fields = ("n_frequency", "scaling", "wavelet_family", "use_idwt", "random_loc_seed",
                      "proportional_parameters", "target_modules", "modules_to_save")

    def check_config(self, raw: dict[str, Any], where: str) -> None:
        check_number(raw, where, "n_frequency", 2592, integer=True, minimum=1)
        check_number(raw, where, "scaling", 25.0)
        check_number(raw, where, "random_loc_seed", 777, integer=True)
        if not isinstance(raw.get("wavelet_family", "db1"), str):
            raise ConfigError(f"{where}: 'wavelet_family' must be a wavelet name such as 'db1', found "
                              f"{raw['wavelet_family']!r}")
        check_target_modules(raw, where)

    def describe(self, config: AdapterConfig) -> str:
        return (f"n_frequency={config.raw.get('n_frequency')} wavelet={config.raw.get('wavelet_family', 'db1')} "
                f"targets={config.target_modules}")

    def expected_shape(self, config: AdapterConfig, key: TensorKey, layer: BaseLayer) -> tuple[int | None, ...]:
        if config.raw.get("proportional_parameters"):
            return (None,)  # PEFT shares the budget out by layer size; its loader checks the exact length
        return (self.rank_for(config, key.module, "n_frequency", 2592, "n_frequency_pattern"),)


WAVEFT = WaveFt()
