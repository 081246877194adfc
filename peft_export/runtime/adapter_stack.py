"""Several LoRA adapters active at once on a switchable graph (PEFT's ``set_adapter(["a", "b"])``), as one adapter.

PEFT adds the branch of every active adapter: ``x @ A1 @ B1 + x @ A2 @ B2``. That sum is one branch whose factors
are theirs side by side along the rank axis, ``x @ [A1 A2] @ [B1; B2]``, and a switchable graph's rank axis is
dynamic, so the stack runs on the same graph exactly (numpy only).
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from .lora_layout import Slot, check_factor_arrays


def stack_factor_arrays(slots: list[Slot], adapters: list[tuple[str, dict[str, np.ndarray]]]
                        ) -> dict[str, np.ndarray]:
    """The graph inputs of ``adapters`` (name, graph-layout arrays) all active at once: per slot, the A factors
    (in, r_i) concatenated along the rank axis and the B factors (r_i, out) likewise, in the same order. Only LoRA
    factors add up this way; an adapter carrying anything else (a DoRA or IA3 scale vector) is refused by name."""
    factor_inputs = {name for slot in slots for name in (slot.input_a, slot.input_b)}
    for name, arrays in adapters:
        other = sorted(set(arrays) - factor_inputs)
        if other:
            raise ConfigError(
                f"Adapter {name!r} carries {other[0]!r}, which is not a LoRA factor (a scale vector, as DoRA and IA3 "
                "adapters have): only plain LoRA adapters can be active together at run time, their branches add "
                "up. Use it alone, or export the adapters merged with --stack-adapters (stack_adapters=True).")
    stacked: dict[str, np.ndarray] = {}
    for slot in slots:
        pairs = [(arrays[slot.input_a], arrays[slot.input_b]) for _, arrays in adapters if slot.input_a in arrays]
        if pairs:
            stacked[slot.input_a] = np.ascontiguousarray(np.concatenate([a for a, _ in pairs], axis=1))  # (in, sum r)
            stacked[slot.input_b] = np.ascontiguousarray(np.concatenate([b for _, b in pairs], axis=0))  # (sum r, out)
    check_factor_arrays(slots, stacked, "the stack of adapters " + " + ".join(repr(n) for n, _ in adapters))
    return stacked
