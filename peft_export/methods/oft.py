"""OFT and BOFT (``peft_type: OFT``, ``BOFT``): the base weight rotated by a learned block-diagonal (OFT) or
butterfly (BOFT) orthogonal matrix, ``R W``; merged by PEFT into the base weights. One module: both rotate by
blocks, and their fields and checks differ only in how the blocks are laid out."""

from __future__ import annotations

from typing import Any

from .base import (MAX_RANK, AdapterConfig, BaseLayer, Capability, TensorKey, check_number,
                   check_target_modules, tensor_pattern)
from .tuner import TunerMethod

ROTATION = Capability(False, "a rotation of the base weight is not an additive low-rank branch, which is all a "
                             "switchable graph runs")


class Oft(TunerMethod):
    peft_type = "OFT"
    name = "OFT"
    switchable = ROTATION
    key_pattern = tensor_pattern("oft_R")
    required_parts = ("oft_R",)
    peft_classes = ("OFTConfig", "peft.tuners.oft", "OFTLayer")
    saved_as_weight = True  # oft_R is a rotation module: "<module>.oft_R.weight"
    summary_fields = ("r", "oft_block_size", "block_share", "coft", "target_modules", "modules_to_save")

    def check_config(self, raw: dict[str, Any], where: str) -> None:
        check_number(raw, where, "r", 0, integer=True, minimum=0, maximum=MAX_RANK)
        check_number(raw, where, "oft_block_size", 32, integer=True, minimum=0, maximum=MAX_RANK)
        check_target_modules(raw, where)

    def describe(self, config: AdapterConfig) -> str:
        return (f"r={config.raw.get('r')} block_size={config.raw.get('oft_block_size')} "
                f"targets={config.target_modules}")

    def expected_shape(self, config: AdapterConfig, key: TensorKey, layer: BaseLayer) -> tuple[int | None, ...]:
        """(blocks, b (b - 1) / 2): the upper triangle of each skew-symmetric b x b block. Where the layer's inputs
        do not divide into blocks PEFT adjusts the sizes itself, and only the rank (2 axes) is checked."""
        r, size = int(config.raw.get("r", 0)), int(config.raw.get("oft_block_size", 32))
        size = size or (layer.in_features // r if r else 0)
        if not size or layer.in_features % size:
            return (None, None)
        return (1 if config.raw.get("block_share") else layer.in_features // size, size * (size - 1) // 2)


class Boft(TunerMethod):
    peft_type = "BOFT"
    name = "BOFT"
    switchable = ROTATION
    key_pattern = tensor_pattern("boft_R", "boft_s")
    required_parts = ("boft_R", "boft_s")
    peft_classes = ("BOFTConfig", "peft.tuners.boft", "BOFTLayer")
    summary_fields = ("boft_block_size", "boft_block_num", "boft_n_butterfly_factor", "target_modules",
                      "modules_to_save")

    def check_config(self, raw: dict[str, Any], where: str) -> None:
        for key, default in (("boft_block_size", 4), ("boft_block_num", 0), ("boft_n_butterfly_factor", 1)):
            check_number(raw, where, key, default, integer=True, minimum=0, maximum=MAX_RANK)
        check_target_modules(raw, where)

    def describe(self, config: AdapterConfig) -> str:
        return (f"block_size={config.raw.get('boft_block_size')} block_num={config.raw.get('boft_block_num')} "
                f"butterfly={config.raw.get('boft_n_butterfly_factor')} targets={config.target_modules}")

    def expected_shape(self, config: AdapterConfig, key: TensorKey, layer: BaseLayer) -> tuple[int | None, ...]:
        """boft_R: (butterfly factors, blocks, b, b); boft_s: a scale per output, (out, 1)."""
        if key.part == "boft_s":
            return (layer.out_features, 1)
        size = int(config.raw.get("boft_block_size", 4))
        if not size and config.raw.get("boft_block_num"):
            size = layer.in_features // int(config.raw["boft_block_num"])
        factors = max(int(config.raw.get("boft_n_butterfly_factor", 1)), 1)
        return (factors, layer.in_features // size, size, size) if size else (factors, None, None, None)


OFT = Oft()
BOFT = Boft()
