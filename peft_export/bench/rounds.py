"""Alternating rounds: contenders measured in turn, the order reversed every other round."""

from __future__ import annotations

from typing import Any, Callable


def alternating_rounds(names: list[str], rounds: int, measure: Callable[[str], Any]) -> dict[str, list[Any]]:
    """``measure(name)`` for every name in every round, the order reversed every other round (so no contender
    always runs right after the same other one, or first while the machine warms up); each name's results by round."""
    results: dict[str, list[Any]] = {name: [] for name in names}
    for round_ in range(rounds):
        for name in (names if round_ % 2 == 0 else names[::-1]):
            results[name].append(measure(name))
    return results
