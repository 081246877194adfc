"""``peft-export add-adapter`` / ``remove-adapter``: change the adapter set of a switchable export, atomically.

The manifest (``peft_export.json``) is the one file that says which adapters an export holds. A change writes
any new adapter file under a name no entry uses, then switches with one rename of the manifest; only after that
is a replaced or removed file deleted. A kill at any moment therefore leaves the old export or the new one (plus,
at most, a file no entry lists, which the next change removes under the folder lock). Every check runs before
anything is written; a full or read-only disk is one error and leaves the folder as it was.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from pathlib import Path
from typing import Any, Callable

from ..errors import AdapterNotFoundError, ConfigError, PeftExportError, ValidationError
from ..runtime.backends import detect_backend
from ..runtime.config import MANIFEST_FILE, RuntimeConfig, read_manifest
from ..runtime.export_files import confined, verify_sha256
from ..runtime.lora_layout import Slot
from ..source.resolve import load_adapter_source, parse_adapter_spec, resolve_model, sha256_file
from .artifact import crash_point, folder_size, write_json
from .pipeline import ExportOptions, PreparedExport, prepare_export
from .switchable import (ADAPTERS_DIR, MERGE_MODE, _adapter_file, _adapter_writer, _base_references, _check_effect,
                         _convert, _graph_files, _manifest_entry, validate_switchable_graph)
from .switchable_adapters import adapter_references, check_switchable_config, check_targets_in_graph

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _locked(folder: Path):
    """One add/remove at a time per export folder (an flock on the folder itself, so no file is created)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; callers must not run two changes at once
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _load_switchable(folder: Path) -> tuple[RuntimeConfig, dict[str, Any]]:
    if not folder.is_dir():
        raise ConfigError(f"Export folder not found: {folder}")
    manifest = read_manifest(folder)
    config = RuntimeConfig.load(folder, manifest)  # the manifest says which adapters the export holds
    if manifest.get("merge_mode") != MERGE_MODE or not config.lora_slots:
        raise ConfigError(
            f"{folder} is a {manifest.get('merge_mode', 'merged')!r} export; adapters can only be added to or "
            "removed from a switchable export (peft-export merge-onnx BASE --adapter NAME=PATH --switchable)"
        )
    return config, manifest


def _check_writable(folder: Path) -> None:
    """Refuse a read-only export before minutes of validation, with one line instead of an OSError traceback."""
    for place in (folder, folder / ADAPTERS_DIR):
        if place.is_dir() and not os.access(place, os.W_OK):
            raise PeftExportError(f"{place} is not writable (read-only file system or permissions); the export "
                                  "was not changed")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _clean_leftovers(folder: Path, config: RuntimeConfig, suffix: str) -> None:
    """Called under the folder lock, which every add/remove-adapter holds while it writes: remove what a killed
    one left behind. Candidate files of dead processes, adapter files that the manifest does not list (written,
    never committed; or replaced, never deleted) and temporary files of interrupted writes. Best effort: a
    read-only folder keeps them."""
    listed = {entry["file"] for entry in config.adapters.values()}
    adapters_dir = folder / ADAPTERS_DIR
    doomed = [p for p in adapters_dir.glob(".*.candidate")
              if not (p.name.split(".")[-2].isdigit() and _alive(int(p.name.split(".")[-2])))]
    doomed += [p for p in adapters_dir.glob(f"*{suffix}") if f"{ADAPTERS_DIR}/{p.name}" not in listed]
    doomed += [*adapters_dir.glob(".*.tmp"), *folder.glob(".*.tmp"), *folder.glob("*.json.tmp")]
    for path in doomed:
        try:
            path.unlink()
        except OSError:
            continue


def _fresh_adapter_file(folder: Path, name: str, suffix: str) -> str:
    """A file name for a new adapter that no entry uses: ``adapters/NAME<suffix>``, or with a random part when
    that name is taken (``--force`` writes the replacement beside the file it replaces)."""
    relative = _adapter_file(name, suffix)
    while (folder / relative).exists():
        relative = f"{ADAPTERS_DIR}/{name}.{secrets.token_hex(4)}{suffix}"
    return relative


def _commit(folder: Path, manifest: dict[str, Any], step: str) -> None:
    """The one switch of an add/remove-adapter: rename the new manifest into place. It keeps the export's file
    hashes (``export.sha256``: no other file changes) and records the adapter files' own."""
    write_json(folder / MANIFEST_FILE, manifest)
    crash_point(f"{step}-committed")


def _prepare_base(manifest: dict[str, Any], folder: Path, base: str | None, token, trust_remote_code: bool,
                  config: RuntimeConfig) -> PreparedExport:
    """The base model and pipeline the export was made from (``base`` overrides where the base is found), checked
    against the export's runtime config."""
    source, saved = manifest.get("source") or {}, manifest.get("export_options") or {}
    model_id = source.get("model_id") or manifest["base"]["id"]
    if model_id != source.get("base_id", model_id):  # an adapter-only folder whose base came from --base or its config
        resolved = resolve_model(model_id, base=base or source.get("base"), revision=source.get("revision"),
                                 base_revision=source.get("base_revision"), token=token)
    else:
        model_id = base or model_id
        resolved = resolve_model(model_id, revision=None if base else source.get("revision"), token=token)
    options = ExportOptions(model_id=model_id, output=folder, opset=saved.get("opset", 17),
                            max_seq_length=saved.get("max_seq_length"), pooling=saved.get("pooling"),
                            normalize=saved.get("normalize"), trust_remote_code=trust_remote_code)
    prepared = prepare_export(options, resolved)
    fresh = prepared.runtime_config(config.model_file, config.dimension).to_dict()
    for key in ("input_names", "max_seq_length", "pooling_modes", "normalize", "has_dense", "do_lower_case"):
        if fresh[key] != getattr(config, key):
            raise ConfigError(
                f"The base model {resolved.base_id!r} does not match this export: {key} is {fresh[key]!r} there and "
                f"{getattr(config, key)!r} in the export. Pass --base with the model the export was made from."
            )
    return prepared


def add_adapter(output: str | Path, spec: str, *, base: str | None = None, force: bool = False,
                allow_noop_adapter: bool = False, trust_remote_code: bool = False, token=None,
                log: Callable[[str], None] = logger.info) -> dict[str, Any]:
    """Convert and validate a PEFT adapter for an existing switchable export, then add its weight file.

    The graph is never modified. Every check runs before anything is written to the folder; a rejected adapter
    leaves it unchanged. Returns the adapter's manifest entry.
    """
    from .merge import attach_adapters

    folder = Path(output)
    name, target = parse_adapter_spec(spec)
    if name is None:
        raise ConfigError(f"Name the adapter: NAME={spec}")
    _load_switchable(folder)
    _check_writable(folder)
    with _locked(folder):
        config, manifest = _load_switchable(folder)
        if name in config.adapters and not force:
            raise ConfigError(f"{folder} already has an adapter named {name!r}; pass --force to replace it, or "
                              "remove it first with `peft-export remove-adapter`")
        adapter = load_adapter_source(target, name=name, token=token)
        check_switchable_config(adapter.config, str(adapter.folder / "adapter_config.json"))
        slots = [Slot.from_dict(s) for s in config.lora_slots]
        check_targets_in_graph(adapter, slots)
        suffix, write_adapter_file = _adapter_writer(detect_backend(config))
        _clean_leftovers(folder, config, suffix)
        recorded = manifest["base"]["id"]
        if adapter.config.base_model_name_or_path and Path(adapter.config.base_model_name_or_path).name != \
                Path(str(recorded)).name:
            log(f"note: adapter {name!r} names base {adapter.config.base_model_name_or_path!r}; this export's base "
                f"is {recorded!r}. Outputs are checked against the export's base below.")
        prepared = _prepare_base(manifest, folder, base, token, trust_remote_code, config)
        peft_model = attach_adapters(prepared.encoder, [adapter])
        base_refs = _base_references(peft_model, prepared)
        refs = adapter_references(peft_model, name, prepared.make_pipeline, prepared.ref_tokenize, base_refs)
        _check_effect(refs, allow_noop_adapter)
        arrays, summary = _convert(peft_model, adapter, slots)

        relative = _fresh_adapter_file(folder, name, suffix)
        final = folder / relative
        candidate = final.with_name(f".{final.name}.{os.getpid()}.candidate")
        replaced = config.adapters.get(name, {}).get("file")
        existing = {}
        for other, entry in config.adapters.items():
            if other != name:
                existing[other] = confined(folder, entry["file"], f"adapter {other!r}'s file")
                verify_sha256(existing[other], entry.get("file_sha256"), f"adapter {other!r}")
        committed = False
        try:
            write_adapter_file(candidate, arrays)
            try:
                validation = validate_switchable_graph(folder, config, base_refs, {name: (candidate, refs)},
                                                       existing, allow_noop_adapter)
            except ValidationError as err:
                if "without an adapter" in str(err):
                    raise ValidationError(
                        f"{err}. The base model used for validation is not the one this export was made from; pass "
                        "--base with that model."
                    ) from err
                raise
            os.replace(candidate, final)  # a new name, listed nowhere yet: the export is still the old one
            crash_point("add-adapter-file-written")
            entry = _manifest_entry(name, folder, summary, validation["adapters"][name], suffix)
            entry["file"], entry["file_sha256"] = relative, sha256_file(final)
            entries = manifest.get("adapters", [])  # a replaced adapter keeps its place
            manifest["adapters"] = ([entry if a["name"] == name else a for a in entries] if replaced
                                    else [*entries, entry])
            files = {**{n: e["file"] for n, e in config.adapters.items()}, name: relative}
            manifest["export"]["files"] = _graph_files(config) + list(files.values())
            manifest["validation"].setdefault("adapter_pair_max_abs_diff", {}).update(
                validation["adapter_pair_max_abs_diff"])
            manifest["size_bytes"] = folder_size(folder) - (_size(folder / replaced) if replaced else 0)
            _commit(folder, manifest, "add-adapter")
            committed = True
        except OSError as err:
            raise PeftExportError(f"Adding adapter {name!r} to {folder} failed: {err.strerror or err}; the export "
                                  "was not changed") from err
        finally:
            candidate.unlink(missing_ok=True)
            if not committed:
                final.unlink(missing_ok=True)
        if replaced and replaced != relative:
            with contextlib.suppress(OSError):  # a leftover file is removed by the next change
                confined(folder, replaced, f"adapter {name!r}'s old file").unlink()
    log(f"added adapter {name!r} to {folder} ({final.stat().st_size / 1e6:.2f} MB): == eager PEFT within "
        f"{validation['adapters'][name]['vs_eager_peft']['max_abs_diff']['sentence_embedding']:.1e}")
    return entry


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def remove_adapter(output: str | Path, name: str, log: Callable[[str], None] = logger.info) -> None:
    """Remove an adapter's entry (one rename of the manifest), then its weight file; the graph is never modified."""
    folder = Path(output)
    _load_switchable(folder)
    _check_writable(folder)
    with _locked(folder):
        config, manifest = _load_switchable(folder)
        suffix, _ = _adapter_writer(detect_backend(config))
        _clean_leftovers(folder, config, suffix)
        if name not in config.adapters:
            raise AdapterNotFoundError(f"{folder} has no adapter named {name!r}; it has {sorted(config.adapters)}")
        removed = config.adapters.pop(name)["file"]
        if config.default_adapter == name:
            config.default_adapter = None
            log(f"{name!r} was the default adapter; the export now loads with no adapter active")
        manifest["adapters"] = [a for a in manifest.get("adapters", []) if a["name"] != name]
        manifest["default_adapter"] = config.default_adapter
        manifest["export"]["files"] = _graph_files(config) + [e["file"] for e in config.adapters.values()]
        pairs = manifest.get("validation", {}).get("adapter_pair_max_abs_diff", {})
        for key in [k for k in pairs if name in k.split(" vs ")]:
            del pairs[key]
        manifest["size_bytes"] = folder_size(folder) - _size(folder / removed)
        try:
            _commit(folder, manifest, "remove-adapter")
        except OSError as err:
            raise PeftExportError(f"Removing adapter {name!r} from {folder} failed: {err.strerror or err}; the "
                                  "export was not changed") from err
        with contextlib.suppress(OSError):  # a leftover file is removed by the next change
            confined(folder, removed, f"adapter {name!r}'s file").unlink()
    log(f"removed adapter {name!r} from {folder}")
