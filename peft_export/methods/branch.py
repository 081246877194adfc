"""What one adapter does at one Linear layer of a switchable graph, in the graph's own terms (torch-free).

A slot of the graph computes, for an input ``x`` (..., in) and the base layer's ``W`` (out, in) and ``bias``::

    x' = x * scale_in                                   # lora_scale_in   (in,)   IA3 on feed-forward layers
    y  = scale_out * (x' @ W.T + x' @ A.T @ B.T)        # lora_scale_out  (out,)  DoRA's m / ||W + s B A||
    y  = scale_post * (y + bias)                        # lora_scale_post (out,)  IA3 on other layers

A method's ``branch_factors`` gives a :class:`Branch` with the parts its PEFT layer uses; a part it leaves out is
the identity (no low-rank branch, scales of one). The graph has a scale input only where some exported adapter
needs it, so graphs of plain low-rank adapters are unchanged. The runtime's ``merge_adapter`` folds the same
arithmetic into the weights from these tensors alone: ``W' = diag(scale_in) (W.T + A.T B.T) diag(scale_out *
scale_post)``, ``bias' = scale_post * bias``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SCALE_IN = "lora_scale_in"  # multiplies the layer's input: (in,)
SCALE_OUT = "lora_scale_out"  # multiplies x W^T plus the low-rank branch, before the bias: (out,)
SCALE_POST = "lora_scale_post"  # multiplies the layer's output after the bias: (out,)
SCALES = (SCALE_IN, SCALE_OUT, SCALE_POST)  # the graph's order of a slot's scale inputs


@dataclass(frozen=True)
class Branch:
    """One adapter at one layer: the low-rank factors ``a`` (r, in) and ``b`` (out, r), scaling folded into ``b``
    (None: no low-rank part), and the scale vectors by kind (``SCALES``), all float32 numpy arrays."""

    a: Any = None
    b: Any = None
    scales: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return 0 if self.a is None else int(self.a.shape[0])
