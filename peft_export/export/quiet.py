"""Keep the libraries an export drives from talking over its own progress lines.

transformers draws a "Loading weights" progress bar for every model it loads (an export loads the base several
times) and transformers, PEFT and torch emit deprecation notices about their own internals that the user can do
nothing about. :func:`third_party_quiet` silences both for the duration of one command and restores everything on
exit; nothing is changed at import (STYLE: no warning filters at import). Hub download progress bars stay on: a
multi-GB download without progress looks like a hang.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator

# Modules whose deprecation notices concern their own internals, not anything the user passed.
_NOISY_MODULES = r"(transformers|peft|torch|onnx|onnxruntime|onnxscript|openvino|nncf|sentence_transformers)(\.|$)"


@contextmanager
def third_party_quiet() -> Iterator[None]:
    """Inside the block: no FutureWarning/DeprecationWarning raised inside the libraries an export drives, and no
    transformers progress bars. Our own log lines, the libraries' real errors, and hub download bars are kept."""
    with warnings.catch_warnings():
        for category in (FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category, module=_NOISY_MODULES)
        restore = _disable_transformers_progress_bars()
        try:
            yield
        finally:
            restore()


def _disable_transformers_progress_bars():
    """Turn transformers' progress bars off, leaving huggingface_hub's download bars as they were; return the undo."""
    try:
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
        from transformers.utils import logging as hf_logging
    except ImportError:  # nothing to silence without transformers
        return lambda: None
    transformers_on = hf_logging.is_progress_bar_enabled()
    hub_off = are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # also turns the hub's off: put those back as they were
    if not hub_off:
        enable_progress_bars()

    def restore() -> None:
        if transformers_on:
            hf_logging.enable_progress_bar()
        if hub_off:
            disable_progress_bars()
        else:
            enable_progress_bars()

    return restore
