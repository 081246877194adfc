"""The runtime config an export folder carries (``embedding_config.json``), read without torch."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

RUNTIME_CONFIG_FILE = "embedding_config.json"
MANIFEST_FILE = "peft_export.json"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_VERSION = 1
# sentence-transformers >= 6 gives every SentenceTransformer empty "query" and "document" prompts, which saved
# prompts override; encode(prompt_name="query") on a model that saved none is accepted and adds nothing.
ST_DEFAULT_PROMPTS = {"query": "", "document": ""}


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
    # Switchable exports: adapter name -> {"file": relative path, r, lora_alpha, modules, ...}, the adapter
    # active when the model loads (None: the base), and the graph's LoRA slots (runtime.lora_layout.Slot dicts).
    adapters: dict[str, dict[str, Any]] = field(default_factory=dict)
    default_adapter: str | None = None
    lora_slots: list[dict[str, Any]] = field(default_factory=list)
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        # Also for exports written before the defaults were recorded: prompt names resolve as in ST 6.x.
        self.prompts = {**ST_DEFAULT_PROMPTS, **(self.prompts or {})}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, folder: Path) -> None:
        """Write through a temporary file and a rename: a reader sees the old file or the new one, never half."""
        path = folder / RUNTIME_CONFIG_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def load(cls, folder: Path) -> RuntimeConfig:
        path = folder / RUNTIME_CONFIG_FILE
        if not path.is_file():
            raise ConfigError(
                f"{folder} is not a peft_export export folder: {RUNTIME_CONFIG_FILE} is missing. "
                "Create one with `peft-export merge-onnx MODEL_ID -o FOLDER`."
            )
        if not (folder / MANIFEST_FILE).is_file():
            raise ConfigError(f"{folder} has no {MANIFEST_FILE}: the export did not finish; export it again")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON: {err}") from err
        if data.get("version") != CONFIG_VERSION:
            raise ConfigError(f"{path} has config version {data.get('version')!r}; this runtime reads {CONFIG_VERSION}")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def read_manifest(folder: str | Path) -> dict[str, Any]:
    if not Path(folder).is_dir():
        raise ConfigError(f"Export folder not found: {folder}")
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise ConfigError(f"{folder} has no {MANIFEST_FILE}; is it a peft_export export folder?")
    return json.loads(path.read_text(encoding="utf-8"))
