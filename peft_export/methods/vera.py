"""VeRA (``peft_type: VERA``): ``W + diag(lambda_b) B diag(lambda_d) A`` with one pair of frozen random
projections ``A``, ``B`` shared by every layer and a pair of trained scale vectors per layer; merged by PEFT into
the base weights, or switchable as the low-rank branch ``A = diag(lambda_d) vera_A[:, :in]``, ``B = diag(lambda_b)
vera_B[:out]`` (exact: PEFT's forward is ``lambda_b * (B (lambda_d * (A x)))``)."""

from __future__ import annotations

import re
from typing import Any

from ..errors import ConfigError
from .base import (MAX_RANK, AdapterConfig, BaseLayer, Capability, TensorKey, check_number, check_target_modules,
                   tensor_pattern)
from .branch import Branch
from .tuner import TunerMethod, finite_factors

# PEFT saves the shared projections once, as "base_model.vera_A" and "base_model.vera_B" (save_projection=True).
SHARED = re.compile(r"^(?:base_model\.)?(?P<name>vera_A|vera_B)$")


class Vera(TunerMethod):
    peft_type = "VERA"
    saved_projections = ("vera_A", "vera_B")
    name = "VeRA"
    switchable = Capability(True)
    key_pattern = tensor_pattern("vera_lambda_b", "vera_lambda_d")
    required_parts = ("vera_lambda_b", "vera_lambda_d")
    peft_classes = ("VeraConfig", "peft.tuners.vera", "VeraLayer")
    summary_fields = ("r", "target_modules", "save_projection", "projection_prng_key", "modules_to_save")

    def check_config(self, raw: dict[str, Any], where: str) -> None:
        check_number(raw, where, "r", 256, integer=True, minimum=1, maximum=MAX_RANK)
        check_number(raw, where, "projection_prng_key", 0, integer=True)
        check_target_modules(raw, where)

    def describe(self, config: AdapterConfig) -> str:
        return f"r={config.raw.get('r')} targets={config.target_modules}"

    def expected_shape(self, config: AdapterConfig, key: TensorKey, layer: BaseLayer) -> tuple[int | None, ...]:
        return (layer.out_features,) if key.part == "vera_lambda_b" else (int(config.raw.get("r", 256)),)

    def shared_tensor(self, key: str) -> str | None:
        match = SHARED.match(key)
        return match.group("name") if match else None

    def check_shared_tensor(self, config: AdapterConfig, where: Any, key: str, name: str,
                            shape: tuple[int, ...]) -> None:
        # vera_A: (r, the largest input of the targeted layers); vera_B: (the largest output, r)
        r = int(config.raw.get("r", 256))
        if len(shape) != 2 or shape[0 if name == "vera_A" else 1] != r:
            wanted = f"({r}, any)" if name == "vera_A" else f"(any, {r})"
            raise ConfigError(f"{where}: {key!r} has shape {tuple(shape)}, expected {wanted} for r={r} in "
                              "adapter_config.json; the config and the weights disagree (was the config edited?)")

    def branch_factors(self, module: Any, adapter_name: str, layer_name: str) -> Branch:
        import torch

        with torch.no_grad():
            lambda_d = module.vera_lambda_d[adapter_name].float()  # (r,)
            lambda_b = module.vera_lambda_b[adapter_name].float()  # (out,)
            vera_a = module.vera_A[adapter_name][:, : module.in_features].float()  # (r, in): the shared slice
            vera_b = module.vera_B[adapter_name][: module.out_features, :].float()  # (out, r)
            factors = finite_factors(adapter_name, layer_name, self.name, A=lambda_d[:, None] * vera_a,
                                     B=lambda_b[:, None] * vera_b)
        return Branch(factors["A"], factors["B"])


VERA = Vera()
