"""The runtime config an export folder carries (``embedding_config.json``), read without torch."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .adapter_names import check_adapter_name
from .atomic_file import write_atomically
from .export_files import confined, verified_bytes

RUNTIME_CONFIG_FILE = "embedding_config.json"  # the embedding task's runtime config
RERANKER_CONFIG_FILE = "reranker_config.json"  # the reranker task's
MANIFEST_FILE = "peft_export.json"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_VERSION = 1
# sentence-transformers >= 6 gives every SentenceTransformer empty "query" and "document" prompts, which saved
# prompts override; encode(prompt_name="query") on a model that saved none is accepted and adds nothing.
ST_DEFAULT_PROMPTS = {"query": "", "document": ""}


GRAPH_SUFFIXES = (".onnx", ".xml")  # what model_file may name: the graph ONNX Runtime or OpenVINO reads


@dataclass
class RuntimeConfig:
    """What the runtime needs to reproduce sentence-transformers' encode() around the graph."""

    backend: str = "onnxruntime"
    model_file: str = "model.onnx"
    input_names: list[str] = field(default_factory=lambda: ["input_ids", "attention_mask"])
    output_names: list[str] = field(default_factory=lambda: ["sentence_embedding", "token_embeddings"])
    dimension: int = 0
    max_seq_length: int = 512
    do_lower_case: bool = False
    pad_token_id: int = 0
    pooling_modes: list[str] = field(default_factory=lambda: ["mean"])
    include_prompt: bool = True
    has_dense: bool = False
    normalize: bool = False
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    similarity_fn_name: str = "cosine"
    # Switchable exports: adapter name -> {"file": relative path, "file_sha256", r, lora_alpha, modules, ...}, the
    # adapter active when the model loads (None: the base), and the graph's LoRA slots (lora_layout.Slot dicts).
    # The adapter table and default adapter are the manifest's (peft_export.json), the one file that says which
    # adapters an export holds: add/remove-adapter change it with one rename. They are filled in at load (exports
    # that also listed them here were written before every file was hashed, and are refused).
    adapters: dict[str, dict[str, Any]] = field(default_factory=dict)
    default_adapter: str | None = None
    lora_slots: list[dict[str, Any]] = field(default_factory=list)
    # Parameters adapters may replace with their own trained copy (modules_to_save; lora_layout.SavedParam dicts).
    # Not written when empty, so exports without them keep the file they had.
    saved_params: list[dict[str, Any]] = field(default_factory=list)
    # Positions the graph's encoder has (max_position_embeddings, less RoBERTa's offset): max_seq_length's limit.
    # None in exports made before it was recorded.
    max_positions: int | None = None
    version: int = CONFIG_VERSION
    # What only one task's runtime needs (a reranker: num_labels, activation_fn); not written when empty, so the
    # embedding task's file stays as it was before tasks had settings of their own.
    task_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Also for exports written before the defaults were recorded: prompt names resolve as in ST 6.x.
        self.prompts = {**ST_DEFAULT_PROMPTS, **(self.prompts or {})}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, folder: Path, file_name: str = RUNTIME_CONFIG_FILE) -> None:
        """Write ``folder/file_name`` (the task's runtime config file) through a temporary file and a rename: a
        reader sees the old file or the new one, never half. A switchable export's adapter table is not written
        here (the manifest holds it)."""
        data = self.to_dict()
        if self.lora_slots:
            del data["adapters"], data["default_adapter"]
        if not self.task_config:
            del data["task_config"]
        if not self.saved_params:
            del data["saved_params"]
        text = json.dumps(data, indent=2) + "\n"
        write_atomically(folder / file_name, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    @classmethod
    def load(cls, folder: Path, manifest: dict[str, Any] | None = None, file_name: str = RUNTIME_CONFIG_FILE
             ) -> RuntimeConfig:
        """The runtime config ``file_name`` (the task's) of the export at ``folder``, checked against the hash its
        manifest records (read here unless given: pass the one the caller goes on using, so both describe the same
        export)."""
        path = folder / file_name
        check_export_folder(folder, file_name)
        if manifest is None:
            manifest = read_manifest(folder)
        data = parse_json_object(verified_bytes(folder, manifest, file_name), path)
        if data.get("version") != CONFIG_VERSION:
            raise ConfigError(f"{path} has config version {data.get('version')!r}; this runtime reads {CONFIG_VERSION}")
        known = set(cls.__dataclass_fields__)
        config = cls(**{k: v for k, v in data.items() if k in known})
        check_values(config, path)
        confined(folder, config.model_file, f"{file_name}'s model_file")
        if Path(config.model_file).suffix.lower() not in GRAPH_SUFFIXES:
            raise ConfigError(
                f"{path}: model_file {config.model_file!r} is not a graph: expected an ONNX model (.onnx) or OpenVINO "
                "IR (.xml) in the export folder. The config was edited or corrupted; export the folder again."
            )
        if config.lora_slots or manifest.get("merge_mode") == "switchable":
            config.adapters, config.default_adapter = adapter_table(folder, manifest)
        return config


def check_export_folder(folder: Path, config_file: str = RUNTIME_CONFIG_FILE) -> None:
    """Refuse a folder that is not an export, or whose export did not finish, before reading anything in it
    (``config_file``: the runtime config file of the task the caller opens)."""
    if not (folder / config_file).is_file():
        raise ConfigError(
            f"{folder} is not a peft_export export folder: {config_file} is missing. "
            "Create one with `peft-export merge-onnx MODEL_ID -o FOLDER`."
        )
    if not (folder / MANIFEST_FILE).is_file():
        raise ConfigError(f"{folder} has no {MANIFEST_FILE}: the export did not finish; export it again")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_values(config: RuntimeConfig, path: Path) -> None:
    """Types and ranges of the values the runtime computes with; each refusal names the key, value and limit."""
    if not _is_int(config.max_seq_length) or config.max_seq_length < 1:
        raise ConfigError(f"{path}: max_seq_length must be a positive integer, found {config.max_seq_length!r}")
    if config.max_positions is not None:
        if not _is_int(config.max_positions) or config.max_positions < 1:
            raise ConfigError(f"{path}: max_positions must be a positive integer, found {config.max_positions!r}")
        if config.max_seq_length > config.max_positions:
            raise ConfigError(f"{path}: max_seq_length {config.max_seq_length} exceeds the graph's "
                              f"{config.max_positions} positions (max_positions); set it to at most "
                              f"{config.max_positions}")
    if not _is_int(config.dimension) or config.dimension < 1:
        raise ConfigError(f"{path}: dimension must be a positive integer, found {config.dimension!r}")
    if not _is_int(config.pad_token_id) or config.pad_token_id < 0:
        raise ConfigError(f"{path}: pad_token_id must be a non-negative integer, found {config.pad_token_id!r}")
    for key in ("input_names", "output_names", "pooling_modes", "lora_slots", "saved_params"):
        if not isinstance(getattr(config, key), list):
            raise ConfigError(f"{path}: {key} must be a list, found {getattr(config, key)!r}")
    for key in ("adapters", "prompts", "task_config"):
        if not isinstance(getattr(config, key), dict):
            raise ConfigError(f"{path}: {key} must be an object, found {getattr(config, key)!r}")


def adapter_table(folder: Path, manifest: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], str | None]:
    """A switchable export's adapters (name -> runtime entry with ``file`` and ``file_sha256``) and default adapter,
    from the manifest, the one file that lists them."""
    entries = manifest.get("adapters") or []
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("name"), str)
                                                for e in entries):
        raise ConfigError(f"{folder}: {MANIFEST_FILE}'s adapters must be a list of objects with a name")
    for entry in entries:  # names become URL path parts and header values: the rule they were exported under
        try:
            check_adapter_name(entry["name"])
        except ConfigError as err:
            raise ConfigError(f"{folder}: {MANIFEST_FILE} lists an adapter named {entry['name']!r:.80}, which no "
                              f"export writes ({err}); the manifest was edited. Export the folder again.") from err
    table = {e["name"]: {k: v for k, v in e.items() if k not in ("name", "validation", "source")} for e in entries}
    default = manifest.get("default_adapter")
    if default is not None and default not in table:
        raise ConfigError(f"{folder}: default_adapter {default!r} is not among the adapters {sorted(table)}")
    return table, default


def folder_not_found(folder: str | Path) -> ConfigError:
    """The error for an export path that is not a folder: missing, or a file of an export (its graph, its manifest)
    given instead of the folder that holds it."""
    if Path(folder).is_file():
        return ConfigError(f"{folder} is a file, not an export folder: pass the folder that holds it "
                           f"({Path(folder).parent})")
    return ConfigError(f"Export folder not found: {folder}")


def read_manifest(folder: str | Path) -> dict[str, Any]:
    if not Path(folder).is_dir():
        raise folder_not_found(folder)
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise ConfigError(f"{folder} has no {MANIFEST_FILE}; is it a peft_export export folder?")
    return read_json_object(path)


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object; anything else is a ConfigError naming the file."""
    return parse_json_object(path.read_bytes(), path)


def parse_json_object(raw: bytes, path: Path) -> dict[str, Any]:
    """``raw`` (the bytes of ``path``) as a JSON object; anything else is a ConfigError naming the file."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data
