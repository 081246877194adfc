"""A reranker's prompts, as sentence-transformers' CrossEncoder applies them: ``predict(prompt_name=...)`` takes one
of the model's ``prompts`` by name, ``prompt=...`` a literal one, and without either the ``default_prompt_name``'s
prompt applies. A prompt goes before the query, or, for a tokenizer with a chat template, becomes the system
message's content (export/pair_template.py records the template with the prompt's place kept apart).

Exports written before prompts were recorded (task_config without ``prompts``) apply their default prompt
(``query_prompt``, or the one baked into ``pair_template``) as before; they know no prompt names, and a chat-template
one takes no other prompt.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..errors import ConfigError

logger = logging.getLogger(__name__)

_TEMPLATE_TEXTS = ("prefix", "middle", "suffix")


def render_prompt(slotted: dict[str, Any], prompt: str) -> dict[str, Any]:
    """The pair template (``prefix``, ``middle``, ``suffix``, ``suffix_ids``) of ``prompt`` from a prompted pair
    template, whose ``before_prompt + prompt + prefix`` is the text before the query."""
    return {"prefix": slotted["before_prompt"] + prompt + slotted["prefix"],
            **{key: slotted[key] for key in ("middle", "suffix", "suffix_ids")}}


def check_pair_template(template: object, where: str, key: str = "pair_template",
                        texts: tuple[str, ...] = _TEMPLATE_TEXTS) -> dict | None:
    """The runtime config's ``task_config.<key>``, checked: the strings ``texts`` and a list of token ids."""
    if template is None:
        return None
    ok = (isinstance(template, dict) and all(isinstance(template.get(k), str) for k in texts)
          and isinstance(template.get("suffix_ids"), list)
          and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in template["suffix_ids"]))
    if not ok:
        raise ConfigError(f"{where}: task_config.{key} must hold the strings {', '.join(texts)} and a "
                          f"list of token ids suffix_ids, found {template!r:.200}; export the folder again")
    return template


class PairPrompts:
    """The prompts of a reranker export (its runtime config's ``task_config``) and how each one is applied."""

    def __init__(self, task_config: dict[str, Any], folder: Path):
        self.folder = folder
        # The default prompt's own form: before the query, or rendered into the chat template's text.
        self.default_template = check_pair_template(task_config.get("pair_template"), str(folder))
        self.query_prompt = task_config.get("query_prompt") or ""
        if not isinstance(self.query_prompt, str):
            raise ConfigError(f"{folder}: task_config.query_prompt must be a string, found {self.query_prompt!r:.100}; "
                              "export the folder again")
        self.recorded = "prompts" in task_config  # False: an export made before prompts were recorded
        self.prompts = task_config.get("prompts") or {}
        self.default_prompt_name = task_config.get("default_prompt_name")
        if not (isinstance(self.prompts, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in self.prompts.items())):
            raise ConfigError(f"{folder}: task_config.prompts must map prompt names to strings, found "
                              f"{self.prompts!r:.200}; export the folder again")
        if self.default_prompt_name is not None and not isinstance(self.default_prompt_name, str):
            raise ConfigError(f"{folder}: task_config.default_prompt_name must be a string or null, found "
                              f"{self.default_prompt_name!r:.100}; export the folder again")
        self.unprompted_template = check_pair_template(task_config.get("unprompted_pair_template"), str(folder),
                                                       "unprompted_pair_template")
        self.prompted_template = check_pair_template(task_config.get("prompted_pair_template"), str(folder),
                                                     "prompted_pair_template", ("before_prompt",) + _TEMPLATE_TEXTS)

    def resolve(self, prompt_name: str | None, prompt: str | None) -> str | None:
        """The prompt a call applies, as sentence-transformers' CrossEncoder resolves it: ``prompt`` as given (with
        a warning where ``prompt_name`` is given too: the prompt wins), else the prompt ``prompt_name`` names (an
        unknown name is refused, naming the known ones), else None: the export's default prompt."""
        if prompt is not None:
            if not isinstance(prompt, str):
                raise TypeError(f"prompt must be a string, found {type(prompt).__name__}")
            if prompt_name is not None:
                logger.warning("Provide either a `prompt`, a `prompt_name`, or neither, but not both. Ignoring the "
                               "`prompt_name` %r in favor of `prompt`.", prompt_name)
            return prompt
        if prompt_name is None:
            return None
        if prompt_name not in self.prompts:
            names = list(self.prompts)
            known = (f"the model's prompts are {names}" if names else
                     "the model has no prompts" if self.recorded else
                     "this export records no prompts (made before peft_export recorded them); export it again")
            # The name cut to 80 characters: a server answers this message to whatever a client sent.
            raise ConfigError(f"Prompt name {prompt_name!r:.80} not found: {known}. Pass one of them as prompt_name, "
                              "or the prompt's text as prompt").in_cli_words(
                f"--prompt-name {prompt_name!r:.80} is not a prompt of {self.folder}: " + (
                    f"choose one of {', '.join(names)}" if names else "it has no prompts; pass --prompt TEXT"))
        return self.prompts[prompt_name]

    def query_prefix(self, prompt: str | None) -> str:
        """The text before each query of a reranker without a chat template (None: the default prompt)."""
        return self.query_prompt if prompt is None else prompt

    def chat_template(self, prompt: str | None) -> dict[str, Any]:
        """The pair template that renders pairs with ``prompt`` (None: the default prompt; "": no system message,
        as sentence-transformers adds none for an empty prompt)."""
        if prompt is None:
            return self.default_template
        if not prompt:
            if self.unprompted_template is None:
                raise self._cannot_apply("an empty prompt")
            return self.unprompted_template
        if self.prompted_template is None:
            raise self._cannot_apply(f"the prompt {prompt[:60]!r}")
        return render_prompt(self.prompted_template, prompt)

    def _cannot_apply(self, what: str) -> ConfigError:
        why = ("was made before peft_export recorded prompts; export it again" if not self.recorded else
               "has a chat template that does not render the prompt as the system message's text, once, before "
               "the query")
        return ConfigError(f"{self.folder} cannot apply {what}: it applies only its default prompt, because it {why}"
                           ).in_cli_words(f"{self.folder} applies only its default prompt: it {why}")
