"""The rungs of the int8 ladder OpenVINO's static quantization climbs (ONNX's ladder comes from measurement:
export/int8_probe.py)."""

from __future__ import annotations

from typing import Iterator

# The int8 ladder both formats climb, from fastest to safest: which feed-forward projections stay in float (the
# family's names, peft_export/export/families.py). The FFN output projections, whose inputs have the widest ranges
# after the activation, are the layers that hurt most.
INT8_LADDER: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("per-channel, all linear layers", ()),
    ("per-channel, FFN output projections kept in fp32", ("output",)),
    ("per-channel, whole FFN kept in fp32", ("output", "input")),
)


def int8_rungs(nodes: list[str], family) -> Iterator[tuple[str, list[str]]]:
    """(strategy, nodes kept in float) for each rung of :data:`INT8_LADDER` over the weight nodes ``nodes``, by the
    family's feed-forward names; a rung that would keep the same nodes as an earlier one (a family without such
    projections) is skipped, as it would only be the same candidate again."""
    tried: set[tuple[str, ...]] = set()
    for strategy, parts in INT8_LADDER:
        excluded = [node for node in nodes if family.ffn_part(node) in parts] if parts else []
        if tuple(excluded) not in tried:
            tried.add(tuple(excluded))
            yield strategy, excluded
