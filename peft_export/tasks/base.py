"""What a model type (task) is to the package: the one seam that a second type (a reranker next to the embedder)
is added through, without a copy of the embedding path.

A :class:`Task` is torch-free and imports nothing of the package above ``runtime``: the layers above read from it
what differs per task. Its parts that need those layers (the torch module wrapped around the encoder, the runtime
class, the server's routes) live in the layer that runs them and are named here as ``"module:attribute"``
references, which only that layer resolves (:func:`load_reference`), so the direction of dependencies stays
``errors <- runtime <- tasks <- source <- export / serve``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..errors import ConfigError

# (reference run, candidate run, attention mask) -> the largest difference of one graph output.
Difference = Callable[[np.ndarray, np.ndarray, np.ndarray], float]


@dataclass(frozen=True)
class GraphOutput:
    """One output of the exported graph, with the tolerance its validation against eager PEFT holds it to."""

    name: str
    tolerance: float
    difference: Difference  # how a run is compared with the reference (e.g. on normalised vectors, masked tokens)
    label: str = ""  # the short name the export log gives its difference (the name where empty)
    per_token: bool = False  # True: (batch, sequence, ...) with a dynamic sequence axis; False: (batch, ...)
    description: str = ""  # how messages name it, as compared (e.g. "normalised embeddings"); the name where empty
    # A switchable graph with no adapter vs the base model: tighter than ``tolerance`` where the values are bounded
    # (unit vectors); None: ``tolerance`` (unbounded logits of several units carry float32 rounding of ~1e-6).
    no_adapter_tolerance: float | None = None

    @property
    def base_tolerance(self) -> float:
        return self.tolerance if self.no_adapter_tolerance is None else self.no_adapter_tolerance

    @property
    def axes(self) -> dict[int, str]:
        """The output's dynamic axes, as torch.onnx.export takes them."""
        return {0: "batch", 1: "sequence"} if self.per_token else {0: "batch"}


@dataclass(frozen=True)
class GateLimit:
    """One threshold of the quality gate of lossy exports on one of the task's figures (``Task.quality``)."""

    figure: str  # a key of the figures Task.quality returns
    keyword: str  # the QualityGate field that holds its limit (and, with dashes, peft-export's flag)
    at_least: bool  # True: the figure passes when >= the limit; False: when <= it
    # Screened on the first rows before the full gate: 0 for a worst-case figure (a subset over the limit means the
    # full set is over it too), a margin for an average (only an estimate on a subset); None: not screened.
    screen_margin: float | None = None

    def fails(self, value: float, limit: float, margin: float = 0.0) -> bool:
        """True unless ``value`` is within ``limit`` (moved by ``margin`` in the figure's favour); NaN fails."""
        return not (value >= limit - margin if self.at_least else value <= limit + margin)

    def failure(self, value: float, limit: float, margin: float = 0.0, prefix: str = "") -> str:
        sign = "<" if self.at_least else ">"
        moved = f" {'-' if self.at_least else '+'} {margin}" if margin else ""
        return f"{prefix}{self.figure} {value:.5f} {sign} {limit}{moved}"


@dataclass(frozen=True)
class GateSpec:
    """How the quality gate of a lossy export runs a task's graph: on which inputs, which output it compares
    (with ``Task.quality``), and the limits on the figures."""

    output: str  # the graph output the gate compares (fp32 graph vs lossy candidate)
    # The gate's query/passage pairs ({"query", "passage"} dicts) -> the inputs the graph runs on (texts, or
    # (first, second) text pairs where the task's text_pairs)
    inputs: Callable[[list[dict[str, str]]], list[Any]]
    # Calibration texts (queries, then passages) -> inputs of the same kind, for the int8 probe and calibration
    calibration_inputs: Callable[[list[str]], list[Any]]
    # (number of gate pairs) -> the rows of the inputs a candidate is screened on before the full gate
    screen_rows: Callable[[int], np.ndarray]
    limits: tuple[GateLimit, ...]
    summary: tuple[str, ...]  # the figures a gated export's manifest entry lists at its top (peft-export info)
    describe: Callable[[dict[str, float]], str]  # the figures as the export log and peft-export info give them


@dataclass(frozen=True)
class Task:
    """Everything that differs between model types. See docs/layout.md, "Adding a model type"."""

    name: str  # as recorded in the manifest and shown by ``peft-export info``
    # sentence-transformers' class for this type: config_sentence_transformers.json's "model_type" when it is saved
    sentence_transformers_class: str
    transformers_auto_class: str  # the transformers auto class the base model is loaded with (export)
    outputs: tuple[GraphOutput, ...]  # the graph's outputs, in the order the torch module returns them
    text_pairs: bool  # True: inputs are (query, passage) pairs tokenized together (a reranker)
    # Real inputs of very different lengths the export is validated on: texts, or (query, passage) pairs where
    # ``text_pairs``; the last one is longer than any max_seq_length.
    validation_texts: tuple[Any, ...]
    runtime_config_file: str  # the runtime's config section of the export folder
    torch_module: str  # "module:function" building the torch module the graph is traced from (export layer)
    runtime_class: str  # "module:Class" the runtime opens the export with
    routes: str  # "module:function" returning the server's routes for a served model of this task
    # (reference vectors, candidate vectors) of the gate's texts -> the gate's figures (lossy exports)
    quality: Callable[[np.ndarray, np.ndarray], dict[str, float]]
    gate: GateSpec  # how the gate of lossy exports runs the graph and judges ``quality``'s figures
    # The Sentence Transformers modules a saved pipeline of this type must have after its Transformer (the
    # embedder's Pooling); a reranker's whole pipeline is its Transformer.
    required_modules: tuple[str, ...] = ()
    # The export modes built for this type so far, of EXPORT_MODES ("merged": one fp32 graph with any adapter
    # merged; "switchable": base graph + adapter files; "lossy": int8 / fp16 / compressed weights, gated).
    export_modes: frozenset[str] = frozenset({"merged", "switchable", "lossy"})
    # Serving (serve/served_model.py): the runtime class's batch call the server's batcher runs, the keyword options
    # the second item of a batch group (adapter, option) stands for, and what a served model must have.
    batch_call: str = "encode"
    batch_options: Callable[[Any], dict[str, Any]] = lambda option: {}
    served_attributes: tuple[str, ...] = ("encode", "max_seq_length")
    # The command that tries an export of this type, {path} its folder (the last line an export prints).
    try_it: str = 'peft-export encode {path} "a sentence to embed"'

    def check_export_mode(self, mode: str, how: str) -> None:
        """Refuse an export ``mode`` this type does not have yet, before any slow stage; ``how`` names the option
        that asked for it (e.g. "--quantize int8")."""
        if mode not in self.export_modes:
            raise ConfigError(
                f"{how}: {mode} exports of {self.sentence_transformers_class} models ({self.name} task) are not "
                f"supported yet; this version exports them {' and '.join(sorted(self.export_modes))} only. Export "
                "without it.")

    @property
    def architecture_suffix(self) -> str:
        """What config.json's ``architectures`` of a plain transformers model of this type end with
        ("ForSequenceClassification" for AutoModelForSequenceClassification); "" where the architecture says
        nothing (AutoModel: any encoder)."""
        return self.transformers_auto_class.removeprefix("AutoModel")

    def describe(self, diffs: dict[str, float]) -> str:
        """``diffs`` (output name -> max difference) as the export log gives them, e.g. "sentence 1.2e-07"."""
        return ", ".join(f"{o.label or o.name} {diffs[o.name]:.2e}" for o in self.outputs if o.name in diffs)

    @property
    def output_names(self) -> list[str]:
        return [output.name for output in self.outputs]

    @property
    def tolerances(self) -> dict[str, float]:
        return {output.name: output.tolerance for output in self.outputs}

    def differences(self, reference: dict[str, np.ndarray], got: dict[str, np.ndarray], mask: np.ndarray
                    ) -> dict[str, float]:
        """The largest difference of each output of a run ``got`` from ``reference`` (inf where not finite)."""
        diffs = {}
        for output in self.outputs:
            value = float(output.difference(reference[output.name], got[output.name], mask))
            diffs[output.name] = value if np.isfinite(value) else float("inf")
        return diffs


def load_reference(reference: str) -> Any:
    """The object a ``"module:attribute"`` reference of a :class:`Task` names, imported now."""
    module, _, attribute = reference.partition(":")
    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"The task reference {reference!r} cannot be loaded: {err}") from err
