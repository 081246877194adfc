"""Adapter methods of every exported model (:class:`.exported_model.ExportedModel`) for switchable exports, with
sentence-transformers' / PEFT's meaning.

State is the active adapter (a name, or several names active at once: LoRA adapters whose branches add up, run as
one stacked adapter, see adapter_stack.py) plus an enabled flag, as in PEFT: ``disable_adapters()`` runs the base until
``enable_adapters()``, whatever ``set_adapter()`` chose meanwhile. ``encode(..., adapter=NAME)`` picks an adapter
for one call without touching that state. Each call resolves its adapter once, under a lock, and hands the
backend a reference to it, so concurrent calls never see each other's adapter and an adapter deleted during a
call stays valid until that call ends. Everything backend-specific goes through the backend's verbs
(:class:`.backends.Backend`: ``lora_input_names``, ``load_adapter``, ``read_adapter``, ``adapter_from_arrays``,
``merge_adapter``, ``run(..., adapter=)``).
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..errors import AdapterNotFoundError, ConfigError, require
from .adapter_names import DEFAULT_ADAPTER_NAME, check_adapter_name
from .adapter_stack import stack_factor_arrays
from .export_files import confined, verify_sha256
from .lora_layout import LORA_A, LORA_B, SavedParam, Slot, check_factor_arrays, unpack_factors, unpack_scales
from .onnxruntime_merge_adapter import MergedAdapter  # numpy only; onnx and onnxruntime load when a merge runs

MAX_CACHED_STACKS = 16  # combinations of adapters active together whose stacked handle is kept for reuse


@dataclass
class LoadedAdapter:
    name: str
    adapter: Any  # the backend's handle
    source: str
    info: dict[str, Any] = field(default_factory=dict)


class AdapterMethods:
    """Mixed into ExportedModel (every exported model class), which provides ``path``, ``config``, ``manifest`` and
    ``backend``."""

    call_name: ClassVar[str] = "encode"  # the class's call that takes ``adapter=`` (messages name it)

    def _init_adapters(self) -> None:
        self._adapter_lock = threading.Lock()
        self._adapters: dict[str, LoadedAdapter] = {}
        self._active_adapter: str | tuple[str, ...] | None = None  # a tuple: several active at once
        self._stacks: dict[tuple[str, ...], tuple[tuple[Any, ...], Any]] = {}  # names -> (their handles, stacked)
        self._adapters_enabled = True
        self._slots = [Slot.from_dict(s) for s in self.config.lora_slots]
        self._saved = [SavedParam.from_dict(p) for p in self.config.saved_params]
        if not self._slots:
            if self.config.adapters:
                raise ConfigError(
                    f"{self.path}: the export lists adapters ({', '.join(sorted(self.config.adapters))}) "
                    "but the graph has no LoRA branches (no lora_slots); the folder was modified. Export it again."
                )
            return
        expected = {name for slot in self._slots for name in slot.inputs}
        expected |= {name for param in self._saved for name in (param.input_value, param.input_use)}
        found = set(self.backend.lora_input_names)
        if found != expected:
            missing = sorted(expected - found) or sorted(found - expected)
            raise ConfigError(
                f"{self.path}: the graph's LoRA inputs do not match embedding_config.json (first difference: "
                f"{missing[0]!r}); the folder was modified. Export it again."
            )
        for name, entry in self.config.adapters.items():
            if not isinstance(entry, dict):
                raise ConfigError(f"{self.path}: adapter {name!r} has no entry with a file and its sha256")
            path = confined(self.path, entry.get("file"), f"adapter {name!r}'s file")
            # Each file is checked against the sha256 the manifest records, then read once: a file replaced or
            # corrupted on disk is refused by name, and one changed later never mixes into this model.
            verify_sha256(path, entry.get("file_sha256"), f"adapter {name!r}")
            self._register(name, self._load_checked(path), entry["file"], entry)
        default = self.config.default_adapter
        if default is not None:
            if default not in self._adapters:
                raise ConfigError(f"{self.path}: default_adapter {default!r} is not among the adapters "
                                  f"{sorted(self._adapters)}")
            self._active_adapter = default

    # ----- helpers -----
    @property
    def is_switchable(self) -> bool:
        """True for exports made with ``--switchable`` (one base graph, adapters chosen per call)."""
        return bool(self._slots)

    def _require_switchable(self, method: str, flag: str | None = None) -> None:
        """Refuse ``method`` (a method name, or a call such as ``encode(adapter=...)``) on a merged export; ``flag``
        is the ``peft-export`` option that reaches it, named instead in the command's message."""
        if not self._slots:
            merged = [a.get("name") for a in self.manifest.get("adapters", [])]
            what = f"adapter {', '.join(map(repr, merged))} merged into its weights" if merged else "no adapters"
            detail = (f"needs a switchable export, but {self.path} is a merged export ({what}). Export with "
                      "`peft-export merge-onnx BASE --adapter NAME=PATH ... --switchable` to switch adapters per call.")
            call = method if method.endswith(")") else f"{method}()"
            error = ConfigError(f"{call} {detail}")
            raise error.in_cli_words(f"{flag} {detail}") if flag else error

    def _load_checked(self, path: Path):
        arrays = self.backend.read_adapter(path)
        check_factor_arrays(self._slots, arrays, str(path), self._saved)
        return self.backend.load_adapter(path, arrays)

    def _register(self, name: str, adapter, source: str, info: dict[str, Any]) -> None:
        with self._adapter_lock:
            if name in self._adapters:
                raise ConfigError(f"Adapter with name {name!r} already exists. Please use a different name.")
            self._adapters[name] = LoadedAdapter(name, adapter, source, dict(info))

    def _unknown(self, name: Any) -> AdapterNotFoundError:
        return AdapterNotFoundError(
            f"Adapter with name {name!r} not found. Loaded adapters: {sorted(self._adapters)}"
        )

    def _adapter_for_call(self, adapter: str | list[str] | bool | None):
        """The backend handle one encode() call runs with (None: the base). ``adapter``: None = the model's state,
        a name = that adapter for this call, a list of names = those adapters active together for this call,
        False = the base for this call."""
        if adapter is None and not self._slots:
            return None
        call = f"{self.call_name}(adapter=...)"
        self._require_switchable(call if adapter is not None else self.call_name, "--adapter")
        if isinstance(adapter, (list, tuple)):
            names = self._stack_names(adapter, call)
            return self._stacked(names) if isinstance(names, tuple) else self._adapter_for_call(names)
        with self._adapter_lock:
            if adapter is None:
                if not self._adapters_enabled or self._active_adapter is None:
                    return None
                active = self._active_adapter
                if not isinstance(active, tuple):
                    return self._adapters[active].adapter
            else:
                if adapter is False:
                    return None
                if not isinstance(adapter, str) or adapter not in self._adapters:
                    raise self._unknown(adapter)
                return self._adapters[adapter].adapter
        return self._stacked(active)

    def _stack_names(self, names: list[str] | tuple[str, ...], call: str) -> str | tuple[str, ...]:
        """One name for a one-element list, else the tuple of several distinct loaded adapters."""
        names = list(names)
        if not names or len(set(names)) != len(names) or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"{call} takes an adapter name or a list of distinct adapter names, found {names!r}")
        with self._adapter_lock:
            for name in names:
                if name not in self._adapters:
                    raise self._unknown(name)
        return names[0] if len(names) == 1 else tuple(names)

    def _stacked(self, names: tuple[str, ...]):
        """The backend handle of ``names`` active together (their LoRA factors side by side along the rank axis),
        built once and reused while every one of them is still the adapter it was built from."""
        with self._adapter_lock:
            missing = [n for n in names if n not in self._adapters]
            if missing:
                raise self._unknown(missing[0])
            handles = tuple(self._adapters[n].adapter for n in names)
            cached = self._stacks.get(names)
            if cached is not None and all(a is b for a, b in zip(cached[0], handles)):
                return cached[1]
        arrays = [(n, self.backend.adapter_arrays(h)) for n, h in zip(names, handles)]  # slow part: no lock
        stacked = self.backend.adapter_from_arrays(stack_factor_arrays(self._slots, arrays))
        with self._adapter_lock:
            while len(self._stacks) >= MAX_CACHED_STACKS:  # per-call lists may name many combinations: keep recent
                self._stacks.pop(next(iter(self._stacks)))
            self._stacks[names] = (handles, stacked)
        return stacked

    # ----- the sentence-transformers / PEFT methods -----
    def list_adapters(self) -> list[str]:
        """Names of the loaded adapters, in load order ([] for a merged export)."""
        with self._adapter_lock:
            return list(self._adapters)

    def load_adapter(self, path_or_id: str | Path, adapter_name: str | None = None, *, revision: str | None = None,
                     token: str | bool | None = None) -> None:
        """Load an adapter and make it the active one, as transformers' ``load_adapter`` does.

        ``path_or_id``: an exported adapter file (``.onnx_adapter`` on ONNX Runtime; ``.safetensors`` on
        OpenVINO, which also reads ``.onnx_adapter`` files when onnxruntime is installed), or a PEFT LoRA adapter
        (folder or hub id), converted for this graph on the fly; that needs the export extra (torch, peft).
        ``adapter_name`` defaults to ``"default"``.
        """
        self._require_switchable("load_adapter")
        name = DEFAULT_ADAPTER_NAME if adapter_name is None else adapter_name
        check_adapter_name(name)
        if name in self._adapters:
            raise ConfigError(f"Adapter with name {name!r} already exists. Please use a different name.")
        path = Path(path_or_id).expanduser()
        if path.is_file():
            adapter, info = self._load_checked(path), {"file": str(path)}
        else:
            convert = require("peft_export.export.switchable_adapters", "export")
            factors, info = convert.convert_peft_adapter(str(path_or_id), self._slots, name, revision=revision,
                                                        token=token)
            adapter = self.backend.adapter_from_arrays(factors)
        self._register(name, adapter, str(path_or_id), info)
        with self._adapter_lock:
            self._active_adapter = name

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make ``adapter_name`` the active adapter, or a list of names the adapters active together (their LoRA
        branches add up, as in PEFT; plain LoRA adapters only). Does not re-enable adapters after
        ``disable_adapters()``."""
        self._require_switchable("set_adapter")
        if isinstance(adapter_name, (list, tuple)):
            adapter_name = self._stack_names(adapter_name, "set_adapter")
            if isinstance(adapter_name, tuple):
                self._stacked(adapter_name)  # refuses adapters that cannot be stacked now, not at the next encode
                with self._adapter_lock:
                    self._active_adapter = adapter_name
                return
        with self._adapter_lock:
            if adapter_name not in self._adapters:
                raise self._unknown(adapter_name)
            self._active_adapter = adapter_name

    def active_adapters(self) -> list[str]:
        """The active adapters: one name, several set together, or [] when none was set (the model runs as the
        base)."""
        self._require_switchable("active_adapters")
        with self._adapter_lock:
            active = self._active_adapter
            return [] if active is None else list(active) if isinstance(active, tuple) else [active]

    def active_adapter(self) -> str | list[str] | None:
        """The active adapter's name, or the list of names when several are active together (as PEFT's)."""
        self._require_switchable("active_adapter")
        with self._adapter_lock:
            active = self._active_adapter
            return list(active) if isinstance(active, tuple) else active

    def enable_adapters(self) -> None:
        """Run with the active adapter again after ``disable_adapters()``."""
        self._require_switchable("enable_adapters")
        with self._adapter_lock:
            self._adapters_enabled = True

    def disable_adapters(self) -> None:
        """Run as the base model until ``enable_adapters()``; the active adapter is kept."""
        self._require_switchable("disable_adapters")
        with self._adapter_lock:
            self._adapters_enabled = False

    def delete_adapter(self, adapter_names: str | list[str]) -> None:
        """Unload adapters from this model (files on disk stay; see ``peft-export remove-adapter``).

        As in PEFT, deleting the active adapter makes the first remaining one active, with a warning.
        """
        self._require_switchable("delete_adapter")
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        with self._adapter_lock:
            missing = [n for n in names if n not in self._adapters]
            if missing:
                raise AdapterNotFoundError(
                    f"The following adapter(s) are not present and cannot be deleted: {', '.join(map(str, missing))}"
                )
            for name in names:
                del self._adapters[name]
            self._stacks = {k: v for k, v in self._stacks.items() if not set(k) & set(names)}
            active = self._active_adapter
            if isinstance(active, tuple) and set(active) & set(names):
                remaining = tuple(n for n in active if n not in names)
                self._active_adapter = remaining if len(remaining) > 1 else (remaining[0] if remaining else None)
                if self._active_adapter is None:
                    self._active_adapter = next(iter(self._adapters), None)
            elif self._active_adapter in names:
                deleted, self._active_adapter = self._active_adapter, next(iter(self._adapters), None)
                if self._active_adapter is not None:
                    warnings.warn(f"Adapter {deleted} was active which is now deleted. Setting active adapter to "
                                  f"{self._active_adapter}.", stacklevel=2)

    def merge_adapter(self, adapter_names: str | list[str] | None = None) -> None:
        """Run these adapters (default: the active one) at the speed of a merged export, as PEFT's
        ``merge_adapter`` does: each gets its own session of the base graph with the adapter merged into the
        weights, built now (about a second for MiniLM). Unlike PEFT, nothing else changes: the base, the other
        adapters, ``set_adapter`` and ``encode(adapter=...)`` work as before, and results stay the same (within
        float rounding, ~1e-7). Costs memory: about half a merged model per merged adapter (ONNX Runtime's
        pre-packed weights; the rest is shared), plus one shared copy of the base weights; and since each merged
        adapter has weights of its own, batch-1 calls that rotate between merged adapters miss the CPU caches
        (measured +37 to +53% on MiniLM with the default settings). ONNX Runtime backend only; needs the ``onnx``
        package (the export extra). ``unmerge_adapter`` frees it again."""
        self._require_switchable("merge_adapter", "--merge-adapter")
        if not self.backend.can_merge_adapters:
            detail = (f"needs the ONNX Runtime backend; this model runs on {self.backend.name}, where adapters "
                      "always run on the switchable graph")
            raise ConfigError(f"merge_adapter() {detail}").in_cli_words(f"--merge-adapter {detail}")
        with self._adapter_lock:
            names = self._names_or_active(adapter_names, "merge_adapter")
            todo = {n: self._adapters[n].adapter for n in names
                    if not isinstance(self._adapters[n].adapter, MergedAdapter)}
        attention = ((self.manifest or {}).get("export") or {}).get("attention")  # None for older exports
        merge = self.backend.merge_adapter
        built = {name: merge(handle, self._slots, attention, saved=self._saved)  # slow: no lock
                 for name, handle in todo.items()}
        with self._adapter_lock:
            for name, handle in built.items():
                loaded = self._adapters.get(name)
                if loaded is not None and loaded.adapter is todo[name]:  # not deleted or replaced meanwhile
                    loaded.adapter = handle

    def unmerge_adapter(self, adapter_names: str | list[str] | None = None) -> None:
        """Run these adapters (default: every merged one) on the switchable graph again and free their sessions."""
        self._require_switchable("unmerge_adapter")
        with self._adapter_lock:
            names = list(self._adapters) if adapter_names is None else self._names_or_active(adapter_names,
                                                                                             "unmerge_adapter")
            for name in names:
                loaded = self._adapters[name]
                if isinstance(loaded.adapter, MergedAdapter):
                    loaded.adapter = loaded.adapter.source

    def merged_adapters(self) -> list[str]:
        """Names of the adapters that run merged (see ``merge_adapter``), in load order."""
        self._require_switchable("merged_adapters")
        with self._adapter_lock:
            return [n for n, a in self._adapters.items() if isinstance(a.adapter, MergedAdapter)]

    def _names_or_active(self, adapter_names: str | list[str] | None, method: str) -> list[str]:
        """Called under the lock: the named adapters (all must be loaded), or the active one."""
        if adapter_names is None:
            if self._active_adapter is None:
                raise AdapterNotFoundError(f"No adapter is active; pass adapter_names to {method}()")
            if isinstance(self._active_adapter, tuple):
                raise ConfigError(f"Several adapters are active together ({', '.join(self._active_adapter)}); "
                                  f"pass adapter_names to {method}(), which takes each adapter on its own")
            return [self._active_adapter]
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            if name not in self._adapters:
                raise self._unknown(name)
        return names

    def get_adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, np.ndarray]:
        """The adapter's LoRA weights with PEFT's keys and shapes (``<module>.lora_A.weight`` (r, in),
        ``<module>.lora_B.weight`` (out, r)); the scaling is folded into ``lora_B``, so ``lora_B @ lora_A`` is the
        exact weight update. Adapters with scale vectors (DoRA, IA3) also give ``<module>.lora_scale_in`` /
        ``lora_scale_out`` / ``lora_scale_post`` (``methods/branch.py`` says what each multiplies).
        ``adapter_name`` defaults to the active adapter."""
        self._require_switchable("get_adapter_state_dict")
        with self._adapter_lock:
            name = self._active_adapter if adapter_name is None else adapter_name
            if name is None:
                raise AdapterNotFoundError("No adapter is active; pass adapter_name")
            if isinstance(name, tuple):
                raise ConfigError(f"Several adapters are active together ({', '.join(name)}); pass adapter_name")
            if name not in self._adapters:
                raise self._unknown(name)
            adapter = self._adapters[name].adapter
        arrays = self.backend.adapter_arrays(adapter)
        state = {}
        for module, (lora_a, lora_b) in unpack_factors(self._slots, arrays).items():
            state[f"{module}.{LORA_A}.weight"] = lora_a
            state[f"{module}.{LORA_B}.weight"] = lora_b
        state.update(unpack_scales(self._slots, arrays))  # DoRA, IA3: by graph input name (methods/branch.py)
        return state
