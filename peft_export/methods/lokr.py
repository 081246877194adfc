"""LoKr (``peft_type: LOKR``): ``W + scaling * kron(w1, w2)``, each factor full or low-rank (``w1_a w1_b``);
merged by PEFT into the base weights."""

from __future__ import annotations

from typing import Any

from .base import AdapterConfig, BaseLayer, Capability, TensorKey, check_number, tensor_pattern
from .loha import check_rank_and_alpha
from .tuner import TunerMethod


class Lokr(TunerMethod):
    peft_type = "LOKR"
    name = "LoKr"
    switchable = Capability(False, "a Kronecker product is not low-rank, so a switchable graph's low-rank branch "
                                   "cannot run it")
    key_pattern = tensor_pattern("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
    required_parts = ("lokr_w1", "lokr_w2")
    alternative_parts = {"lokr_w1": ("lokr_w1_a", "lokr_w1_b"), "lokr_w2": ("lokr_w2_a", "lokr_w2_b")}
    peft_classes = ("LoKrConfig", "peft.tuners.lokr", "LoKrLayer")
    summary_fields = ("r", "alpha", "target_modules", "decompose_both", "decompose_factor", "modules_to_save")

    def check_config(self, raw: dict[str, Any], where: str) -> None:
        check_rank_and_alpha(raw, where)
        factor = raw.get("decompose_factor", -1)
        if factor != -1:
            check_number(raw, where, "decompose_factor", -1, integer=True, minimum=1)

    def describe(self, config: AdapterConfig) -> str:
        return (f"r={config.raw.get('r')} alpha={config.raw.get('alpha')} "
                f"decompose_factor={config.raw.get('decompose_factor', -1)} targets={config.target_modules}")

    def expected_shape(self, config: AdapterConfig, key: TensorKey, layer: BaseLayer) -> tuple[int | None, ...]:
        """PEFT's factorisation: out = a * c, in = b * d; w1 is (a, b), w2 is (c, d), or r-rank products."""
        from peft.tuners.lokr.layer import factorization  # only called where PEFT is loaded (export/)

        factor = int(config.raw.get("decompose_factor", -1))
        out_l, out_k = factorization(layer.out_features, factor)
        in_m, in_n = factorization(layer.in_features, factor)
        rows, cols = (out_l, in_m) if key.part.startswith("lokr_w1") else (out_k, in_n)
        r = self.rank_for(config, key.module)
        return {"": (rows, cols), "_a": (rows, r), "_b": (r, cols)}[key.part[len("lokr_w1"):]]


LOKR = Lokr()
