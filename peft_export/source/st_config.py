"""Read a Sentence Transformers folder's module configs without importing sentence-transformers.

Two generations of file layout exist: sentence-transformers < 5.x writes module types such as
``sentence_transformers.models.Pooling`` and boolean ``pooling_mode_*`` keys; 6.x writes
``sentence_transformers.base.modules.transformer.Transformer`` and a single ``pooling_mode`` key, and keeps
``max_seq_length`` in the tokenizer config. Both are accepted. Module types outside the short list below are
refused without importing anything (they would need remote code).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, UnsafeModelError

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
SIMILARITY_FUNCTIONS = ("cosine", "dot", "euclidean", "manhattan")
# Activations a Dense module may name; anything else would need an import of user-chosen code.
DENSE_ACTIVATIONS = {
    "torch.nn.modules.activation.Tanh": "tanh",
    "torch.nn.modules.linear.Identity": "identity",
    "torch.nn.modules.activation.ReLU": "relu",
    "torch.nn.modules.activation.GELU": "gelu",
    "torch.nn.modules.activation.Sigmoid": "sigmoid",
    "torch.nn.modules.activation.SiLU": "silu",
}

# Last component of the module type -> our kind. Old and new package paths both end in the class name.
_KNOWN_MODULE_PREFIXES = ("sentence_transformers.",)
_KNOWN_MODULE_CLASSES = {"Transformer": "transformer", "Pooling": "pooling", "Dense": "dense", "Normalize": "normalize"}


@dataclass
class DenseConfig:
    path: str
    in_features: int
    out_features: int
    bias: bool = True
    activation: str = "tanh"
    use_residual: bool = False


@dataclass
class PoolingConfig:
    modes: list[str] = field(default_factory=lambda: ["mean"])
    include_prompt: bool = True
    embedding_dimension: int | None = None


@dataclass
class PipelineConfig:
    """Everything after the encoder, plus the encoder's input settings."""

    transformer_path: str = ""
    max_seq_length: int | None = None
    do_lower_case: bool = False
    pooling: PoolingConfig = field(default_factory=PoolingConfig)
    dense: list[DenseConfig] = field(default_factory=list)
    normalize: bool = False
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    similarity_fn_name: str = "cosine"
    is_sentence_transformer: bool = False
    activation_fn: Any = None  # a CrossEncoder's, as config_sentence_transformers.json names it (unchecked)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PipelineConfig:
        data = dict(data)
        data["pooling"] = PoolingConfig(**data.get("pooling", {}))
        data["dense"] = [DenseConfig(**d) for d in data.get("dense", [])]
        return cls(**data)


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _module_kind(module_type: str) -> str:
    if not isinstance(module_type, str) or not module_type.startswith(_KNOWN_MODULE_PREFIXES):
        raise UnsafeModelError(
            f"modules.json names the module type {module_type!r}, which is not one of sentence-transformers' own "
            f"modules ({', '.join(_KNOWN_MODULE_CLASSES)}). Custom module code is never imported; "
            "export the model with a standard Sentence Transformers pipeline."
        )
    class_name = module_type.rsplit(".", 1)[-1]
    if class_name not in _KNOWN_MODULE_CLASSES:
        raise ConfigError(
            f"modules.json names {module_type!r}; peft_export supports {', '.join(_KNOWN_MODULE_CLASSES)} modules only"
        )
    return _KNOWN_MODULE_CLASSES[class_name]


def _pooling_modes(cfg: dict[str, Any], path: Path) -> list[str]:
    mode = cfg.get("pooling_mode")
    if mode is None:
        modes = [m for key, m in _LEGACY_POOLING_KEYS.items() if cfg.get(key)]
        modes = modes or ["mean"]
    else:
        modes = [mode] if isinstance(mode, str) else list(mode)
    for m in modes:
        if m not in POOLING_MODES:
            raise ConfigError(f"{path}: pooling mode {m!r} is not one of {', '.join(POOLING_MODES)}")
    return modes


def _read_pooling(folder: Path) -> PoolingConfig:
    path = folder / "config.json"
    cfg = read_json(path)
    dim = cfg.get("embedding_dimension", cfg.get("word_embedding_dimension"))
    return PoolingConfig(
        modes=_pooling_modes(cfg, path), include_prompt=bool(cfg.get("include_prompt", True)), embedding_dimension=dim
    )


def _read_dense(folder: Path, rel_path: str) -> DenseConfig:
    path = folder / "config.json"
    cfg = read_json(path)
    activation_name = cfg.get("activation_function", "torch.nn.modules.activation.Tanh")
    if activation_name is None:
        activation_name = "torch.nn.modules.linear.Identity"
    if activation_name not in DENSE_ACTIVATIONS:
        raise UnsafeModelError(
            f"{path}: activation_function {activation_name!r} is not one of the supported torch activations "
            f"({', '.join(sorted(DENSE_ACTIVATIONS))})"
        )
    try:
        return DenseConfig(
            path=rel_path,
            in_features=int(cfg["in_features"]),
            out_features=int(cfg["out_features"]),
            bias=bool(cfg.get("bias", True)),
            activation=DENSE_ACTIVATIONS[activation_name],
            use_residual=bool(cfg.get("use_residual", False)),
        )
    except KeyError as err:
        raise ConfigError(f"{path} lacks the key {err.args[0]!r}") from err


def _read_transformer_settings(folder: Path) -> tuple[int | None, bool]:
    max_len: int | None = None
    lower = False
    for name in ("sentence_bert_config.json", "sentence_roberta_config.json", "sentence_xlm-roberta_config.json"):
        if (folder / name).is_file():
            cfg = read_json(folder / name)
            max_len = cfg.get("max_seq_length", max_len)
            if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1):
                raise ConfigError(f"{folder / name}: 'max_seq_length' must be a positive integer (or null for the "
                                  f"tokenizer's limit), found {max_len!r}")
            lower = bool(cfg.get("do_lower_case", lower))
            break
    if max_len is None and (folder / "tokenizer_config.json").is_file():
        # sentence-transformers >= 6 stores the limit as the tokenizer's model_max_length.
        value = read_json(folder / "tokenizer_config.json").get("model_max_length")
        if isinstance(value, int) and value < 1_000_000:
            max_len = value
    return max_len, lower


def read_pipeline_config(folder: str | Path, required_modules: tuple[str, ...] = ("pooling",)) -> PipelineConfig:
    """Parse ``modules.json`` and friends in ``folder``; a folder without modules.json is a plain encoder.
    ``required_modules``: the modules the model type needs after its Transformer (tasks/: Task.required_modules)."""
    folder = Path(folder)
    config = PipelineConfig()
    modules_path = folder / "modules.json"
    if not modules_path.is_file():
        config.max_seq_length, config.do_lower_case = _read_transformer_settings(folder)
        return config

    try:
        modules = json.loads(modules_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{modules_path} is not valid JSON: {err}") from err
    if not isinstance(modules, list):
        raise ConfigError(f"{modules_path} must hold a list of modules")
    config.is_sentence_transformer = True
    kinds = []
    for module in sorted(modules, key=lambda m: m.get("idx", 0)):
        kind = _module_kind(module.get("type"))
        rel = module.get("path", "") or ""
        sub = (folder / rel).resolve()
        if folder.resolve() not in (sub, *sub.parents):
            raise UnsafeModelError(f"{modules_path}: module path {rel!r} points outside the model folder")
        kinds.append(kind)
        if kind == "transformer":
            config.transformer_path = rel
            config.max_seq_length, config.do_lower_case = _read_transformer_settings(sub)
        elif kind == "pooling":
            config.pooling = _read_pooling(sub)
        elif kind == "dense":
            config.dense.append(_read_dense(sub, rel))
        elif kind == "normalize":
            config.normalize = True
    if not kinds or kinds[0] != "transformer":
        raise ConfigError(f"{modules_path}: the first module must be a Transformer, found {kinds[:1]}")
    if "pooling" in required_modules and "pooling" not in kinds:
        raise ConfigError(f"{modules_path}: no Pooling module, which a sentence embedding model needs (a "
                          "CrossEncoder names itself in config_sentence_transformers.json's model_type)")

    st_path = folder / "config_sentence_transformers.json"
    if st_path.is_file():
        st_cfg = read_json(st_path)
        config.prompts = {k: v for k, v in (st_cfg.get("prompts") or {}).items() if isinstance(v, str)}
        config.default_prompt_name = st_cfg.get("default_prompt_name")
        config.similarity_fn_name = st_cfg.get("similarity_fn_name") or "cosine"
        config.activation_fn = st_cfg.get("activation_fn")  # a value that is no torch path is refused at export
    if config.similarity_fn_name not in SIMILARITY_FUNCTIONS:
        raise ConfigError(
            f"{st_path}: similarity_fn_name {config.similarity_fn_name!r} is not one of "
            f"{', '.join(SIMILARITY_FUNCTIONS)}"
        )
    return config
