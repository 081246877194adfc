"""PEFT-wide ``modules_to_save``: the trained full copies of modules any tuner's config may carry, found in an
adapter file and checked against the base's parameters (merged exports take them; switchable exports give them
graph inputs where they are small)."""

from __future__ import annotations

import re
from typing import Any, Iterable

from ..errors import ConfigError

SAVED_MODULE_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<param>.+)$")


def saved_module_of(param: str, modules_to_save: Iterable[str]) -> str | None:
    """The ``modules_to_save`` entry whose module holds base parameter ``param`` (PEFT's rule: the module's name is
    the entry or ends with ``.entry``), or None."""
    parts = param.split(".")
    for end in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:end])
        for entry in modules_to_save:
            if module == entry or module.endswith("." + entry):
                return module
    return None


def check_saved_tensor(where: Any, key: str, param: str, shape: tuple[int, ...], params: dict[str, tuple[int, ...]],
                       base_name: str) -> None:
    """A trained copy must replace a parameter the base has, with its shape."""
    if param not in params:
        raise ConfigError(
            f"{where}: tensor {key!r} is a trained copy (modules_to_save) of parameter {param!r}, which the base "
            f"model ({base_name}) does not have; was this adapter trained on another base?")
    if tuple(shape) != params[param]:
        raise ConfigError(
            f"{where}: tensor {key!r} (modules_to_save) has shape {tuple(shape)} but the base parameter {param!r} "
            f"has shape {params[param]}; was this adapter trained on another base?")


def check_saved_complete(entries: list[str], where: Any, saved: dict[str, set[str]],
                         params: dict[str, tuple[int, ...]], prefix: str) -> None:
    """Every module ``modules_to_save`` (``entries``) names must be in the file with all its parameters: PEFT would
    otherwise keep the base's values for the missing ones without a word (or, for a module missing entirely, fail
    with a KeyError). Heads the embedding never reads are checked too, for that reason."""
    for param in sorted(params):
        module = saved_module_of(param, entries)
        if module is None or param in saved.get(module, ()):
            continue
        raise ConfigError(
            f"{where}: tensor {prefix}{param} is missing: modules_to_save {entries!r} stores a trained copy of "
            f"{module!r}, but the file has no {param!r} for it. The file is incomplete or belongs to another "
            "adapter; save the adapter again.")
