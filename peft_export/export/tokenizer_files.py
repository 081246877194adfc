"""The tokenizer files of an export: saved without remote-code pointers, and checked to tokenize exactly as the
reference tokenizer the graph was validated with."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..runtime.atomic_file import write_json
from ..runtime.tokenizer import TextTokenizer


# Keys of tokenizer_config.json that make transformers import code named by the file (remote code), dropped from
# exports: the runtime never needs them, and a user loading the folder with transformers should not run them.
_REMOTE_CODE_KEYS = ("auto_map",)


def save_tokenizer(tokenizer, folder: Path) -> None:
    """``tokenizer.save_pretrained(folder)`` without remote-code pointers (``auto_map``) in tokenizer_config.json."""
    tokenizer.save_pretrained(str(folder))
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict) and any(key in data for key in _REMOTE_CODE_KEYS):
        write_json(path, {k: v for k, v in data.items() if k not in _REMOTE_CODE_KEYS})


def check_runtime_tokenizer(runtime_tok: TextTokenizer, reference_tok, texts: list, text_pairs: bool = False
                            ) -> None:
    """The runtime's tokenizer (tokenizers library) must give exactly the reference ids and token types,
    truncation included; ``texts`` are (first, second) pairs where the task takes ``text_pairs``."""
    for text in texts:
        got_all = runtime_tok.encode_pairs([text]) if text_pairs else runtime_tok.encode([text])
        want_all = reference_tok([text])
        for name in sorted(set(got_all) & set(want_all)):
            got, want = got_all[name][0], want_all[name][0]
            if got.shape == want.shape and np.array_equal(got, want):
                continue
            shown = (text[0][:30], text[1][:30]) if text_pairs else text[:40]
            raise ConfigError(
                f"The exported tokenizer does not reproduce the reference {name} of {shown!r}: "
                f"{got[:12].tolist()}... vs {want[:12].tolist()}..."
            )
