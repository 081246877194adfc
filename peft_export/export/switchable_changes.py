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

from ..errors import ConfigError, PeftExportError, ValidationError
from ..runtime.backends import detect_backend
from ..runtime.config import RuntimeConfig
from ..runtime.export_files import confined, verify_sha256
from ..runtime.lora_layout import SavedParam, Slot
from ..source.resolve import load_adapter_source, parse_adapter_spec, resolve_model, sha256_file
from .output_folder import crash_point, folder_size
from .pipeline import ExportOptions, PreparedExport, prepare_export
from .switchable import (adapter_manifest_entry, adapter_writer, base_references, check_effect, convert_adapter,
                         validate_switchable_graph)
from .switchable_folder import (ADAPTERS_DIR, adapter_file, check_writable, clean_leftovers, commit_manifest, file_size,
                                graph_files, load_switchable, locked)
from .switchable_adapters import adapter_references, check_switchable_config, check_targets_in_graph

logger = logging.getLogger(__name__)


def _fresh_adapter_file(folder: Path, name: str, suffix: str) -> str:
    """A file name for a new adapter that no entry uses: ``adapters/NAME<suffix>``, or with a random part when
    that name is taken (``--force`` writes the replacement beside the file it replaces)."""
    relative = adapter_file(name, suffix)
    while (folder / relative).exists():
        relative = f"{ADAPTERS_DIR}/{name}.{secrets.token_hex(4)}{suffix}"
    return relative


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
            found = (f"The base model {resolved.base_id!r} does not match this export: {key} is {fresh[key]!r} there "
                     f"and {getattr(config, key)!r} in the export. Pass")
            raise ConfigError(f"{found} the model the export was made from as base=...").in_cli_words(
                f"{found} --base with the model the export was made from.")
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
    load_switchable(folder)
    check_writable(folder)
    with locked(folder):
        config, manifest = load_switchable(folder)
        if name in config.adapters and not force:
            taken = f"{folder} already has an adapter named {name!r}; pass"
            raise ConfigError(f"{taken} force=True to replace it, or remove it first with remove_adapter()"
                              ).in_cli_words(f"{taken} --force to replace it, or remove it first with "
                                             "`peft-export remove-adapter`")
        adapter = load_adapter_source(target, name=name, token=token)
        check_switchable_config(adapter.config, str(adapter.folder / "adapter_config.json"))
        slots = [Slot.from_dict(s) for s in config.lora_slots]
        check_targets_in_graph(adapter, slots)
        suffix, write_adapter_file = adapter_writer(detect_backend(config))
        clean_leftovers(folder, config, suffix)
        recorded = manifest["base"]["id"]
        if adapter.config.base_model_name_or_path and Path(adapter.config.base_model_name_or_path).name != \
                Path(str(recorded)).name:
            log(f"note: adapter {name!r} names base {adapter.config.base_model_name_or_path!r}; this export's base "
                f"is {recorded!r}. Outputs are checked against the export's base below.")
        prepared = _prepare_base(manifest, folder, base, token, trust_remote_code, config)
        peft_model = attach_adapters(prepared.encoder, [adapter])
        base_refs = base_references(peft_model, prepared)
        refs = adapter_references(peft_model, name, prepared.make_pipeline, prepared.ref_tokenize, base_refs,
                                  prepared.task)
        check_effect(refs, allow_noop_adapter)
        saved = [SavedParam.from_dict(p) for p in config.saved_params]
        arrays, summary = convert_adapter(peft_model, adapter, slots, saved=saved)

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
                                                       existing, allow_noop_adapter, prepared.task)
            except ValidationError as err:
                if "without an adapter" in str(err):
                    wrong = "The base model used for validation is not the one this export was made from; pass"
                    raise ValidationError(f"{err}. {wrong} that model as base=...").in_cli_words(
                        f"{err.for_cli()}. {wrong} --base with that model.") from err
                raise
            os.replace(candidate, final)  # a new name, listed nowhere yet: the export is still the old one
            crash_point("add-adapter-file-written")
            entry = adapter_manifest_entry(name, folder, summary, validation["adapters"][name], suffix)
            entry["file"], entry["file_sha256"] = relative, sha256_file(final)
            entries = manifest.get("adapters", [])  # a replaced adapter keeps its place
            manifest["adapters"] = ([entry if a["name"] == name else a for a in entries] if replaced
                                    else [*entries, entry])
            files = {**{n: e["file"] for n, e in config.adapters.items()}, name: relative}
            manifest["export"]["files"] = graph_files(config) + list(files.values())
            manifest["validation"].setdefault("adapter_pair_max_abs_diff", {}).update(
                validation["adapter_pair_max_abs_diff"])
            manifest["size_bytes"] = folder_size(folder) - (file_size(folder / replaced) if replaced else 0)
            commit_manifest(folder, manifest, "add-adapter")
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
        f"{max(validation['adapters'][name]['vs_eager_peft']['max_abs_diff'].values()):.1e}")
    return entry
