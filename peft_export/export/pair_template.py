"""Pairs rendered through the tokenizer's chat template, as sentence-transformers 6.x's CrossEncoder renders them.

A CrossEncoder whose tokenizer has a chat template (the converted Qwen3 rerankers, e.g. Qwen3-Reranker-0.6B-seq-cls)
does not tokenize a (query, document) pair with the tokenizer's pair post-processor: sentence-transformers turns the
pair into two messages with the roles "query" and "document" (after a "system" message holding the prompt, where a
prompt applies), renders them with the chat template, tokenizes the rendered text (no special tokens added),
truncates it on the right at max_length, and writes the template's fixed tail (its suffix tokens, e.g. the
assistant prefill) back over the last tokens of every truncated row, so that the last-token score still reads the
tail.

The torch-free runtime renders no Jinja: at export, :func:`chat_pair_template` renders the template with marker
contents and cuts it into ``prefix + query + middle + document + suffix``, checked to hold for other contents (a
template whose text depends on the contents is refused), and derives the suffix tokens the way sentence-transformers
does. The runtime tokenizer (runtime/tokenizer.py) formats and truncates pairs with these; the export's reference
tokenization (:func:`chat_template_tokenizer`) uses transformers' own rendering, so the export's tokenizer check
compares the two.

A prompt other than the default (``predict(prompt_name=...)`` or ``prompt=...``) is the system message's content:
:func:`prompted_pair_template` renders the template once more with marker prompts and records the text before the
prompt apart, so the runtime renders ``before_prompt + prompt + prefix + query + middle + document + suffix`` for
any prompt; :func:`unprompted_pair_template` is the render without a system message (``prompt=""``).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..errors import ConfigError
from ..runtime.pair_prompts import render_prompt

PAIR_ROLES = ("query", "document")
_MARKERS = (("\x00Q\x00", "\x00D\x00"), ("qq\x01", "dd\x01"))
_PROMPT_MARKERS = ("\x00P\x00", " pp\x02 ")  # the second's spaces catch a template that trims the prompt
_SUFFIX_FILLERS = ("0", "1 2 3 4")  # tokenize differently: their renders' common token tail is the template's


def _messages(query: str, document: str, prompt: str | None) -> list[dict[str, str]]:
    system = [{"role": "system", "content": prompt}] if prompt else []
    return system + [{"role": PAIR_ROLES[0], "content": query}, {"role": PAIR_ROLES[1], "content": document}]


def _render(tokenizer, query: str, document: str, prompt: str | None) -> str:
    return tokenizer.apply_chat_template(_messages(query, document, prompt), tokenize=False)


def _suffix_ids(tokenizer, prompt: str | None) -> list[int]:
    """The template's fixed tail in tokens, as sentence-transformers derives it: the longest common token suffix
    of two renders whose query and document are different fillers (empty where the renders never diverge)."""
    first, second = (tokenizer(_render(tokenizer, filler, filler, prompt), add_special_tokens=False)["input_ids"]
                     for filler in _SUFFIX_FILLERS)
    count = 0
    for left, right in zip(reversed(first), reversed(second)):
        if left != right:
            break
        count += 1
    return list(first[len(first) - count:]) if 0 < count < min(len(first), len(second)) else []


def chat_pair_template(tokenizer, prompt: str | None, where: str) -> dict[str, Any] | None:
    """``{"prefix", "middle", "suffix", "suffix_ids"}`` of a tokenizer with a chat template (None without one):
    a pair renders as ``prefix + query + middle + document + suffix``. ``where`` names the model in errors."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    parts = []
    for query, document in _MARKERS:
        rendered = _render(tokenizer, query, document, prompt)
        if rendered.count(query) != 1 or rendered.count(document) != 1 or rendered.index(query) > rendered.index(
                document):
            raise ConfigError(
                f"{where}: the tokenizer's chat template does not render a (query, document) pair as one query "
                "followed by one document (messages with the roles 'query' and 'document'), found "
                f"{rendered[:200]!r}; peft_export exports rerankers whose template does, or none")
        prefix, rest = rendered.split(query)
        middle, suffix = rest.split(document)
        parts.append((prefix, middle, suffix))
    if parts[0] != parts[1]:
        raise ConfigError(f"{where}: the tokenizer's chat template renders its fixed text differently for other "
                          "query and document contents; the runtime can only add a fixed text around them")
    prefix, middle, suffix = parts[0]
    return {"prefix": prefix, "middle": middle, "suffix": suffix, "suffix_ids": _suffix_ids(tokenizer, prompt)}


def unprompted_pair_template(tokenizer, where: str) -> dict[str, Any] | None:
    """:func:`chat_pair_template` without a system message: the render of ``prompt=""`` (sentence-transformers adds
    no system message for an empty prompt)."""
    return chat_pair_template(tokenizer, None, where)


def prompted_pair_template(tokenizer, prompts: dict[str, str], where: str) -> dict[str, Any] | None:
    """``{"before_prompt", "prefix", "middle", "suffix", "suffix_ids"}``: a pair with the prompt P renders as
    ``before_prompt + P + prefix + query + middle + document + suffix``. None without a chat template, or where the
    template does not put the prompt once, verbatim, before the query with the same fixed text around it for the
    marker prompts and each of ``prompts`` (that export then applies its default prompt only)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    parts = []
    for marker in _PROMPT_MARKERS:
        template = chat_pair_template(tokenizer, marker, where)
        head = template["prefix"]
        if head.count(marker) != 1 or marker in template["middle"] + template["suffix"]:
            return None
        before, after = head.split(marker)
        parts.append({"before_prompt": before, "prefix": after, **{k: template[k] for k in (
            "middle", "suffix", "suffix_ids")}})
    if parts[0] != parts[1]:
        return None
    slotted = parts[0]
    for prompt in prompts.values():  # each named prompt renders as the slot says, tail tokens included
        if prompt and chat_pair_template(tokenizer, prompt, where) != render_prompt(slotted, prompt):
            return None
    return slotted


def chat_template_tokenizer(tokenizer, input_names: list[str], max_len: int, prompt: str | None
                            ) -> Callable[..., dict[str, np.ndarray]]:
    """The reference tokenization of pairs through the chat template (transformers renders it), truncated at
    ``max_length`` with the template's suffix written back over the end of truncated rows, as
    sentence-transformers does; padding on the tokenizer's own side."""
    suffix = _suffix_ids(tokenizer, prompt)

    def tokenize(pairs: list, max_length: int | None = None) -> dict[str, np.ndarray]:
        limit = min(max_length or max_len, max_len)
        conversations = [_messages(query, document, prompt) for query, document in pairs]
        enc = tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=True, padding=True,
                                            truncation=True, max_length=limit, return_tensors="np")
        ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
        width = ids.shape[1]
        for row in range(len(ids)):
            real = int(mask[row].sum())
            keep = min(len(suffix), real)
            if real < limit or keep == 0:
                continue
            end = width if mask[row, 0] == 0 else real  # left-padded rows end at the last column
            ids[row, end - keep:end] = suffix[-keep:]
        features = {"input_ids": ids, "attention_mask": mask,
                    "token_type_ids": np.zeros_like(ids)}
        return {name: features[name] for name in input_names}

    return tokenize


def default_prompt(pipeline) -> str | None:
    """The prompt sentence-transformers applies when none is asked for: the one ``default_prompt_name`` names."""
    name = getattr(pipeline, "default_prompt_name", None)
    return (getattr(pipeline, "prompts", None) or {}).get(name) if name else None
