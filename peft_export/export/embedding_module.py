"""The whole embedding pipeline as one torch module, so that one ONNX/OpenVINO graph holds it all.

Pooling is re-implemented here (instead of calling sentence-transformers' Pooling) because the exported graph
must not depend on sentence-transformers and must trace cleanly with dynamic batch and sequence axes. Each mode
follows sentence-transformers' definition for right-padded inputs; tests check equality against it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, UnsafeModelError
from ..source.st_config import DenseConfig, PipelineConfig, PoolingConfig

_ACTIVATIONS = {
    "tanh": nn.Tanh,
    "identity": nn.Identity,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
}


def pool(token_embeddings: torch.Tensor, attention_mask: torch.Tensor, config: PoolingConfig) -> torch.Tensor:
    """(batch, seq, hidden), (batch, seq) -> (batch, hidden * n_modes), right padding assumed."""
    mask = attention_mask.to(token_embeddings.dtype).unsqueeze(-1)  # (batch, seq, 1)
    outputs = []
    for mode in config.modes:
        if mode == "cls":
            outputs.append(token_embeddings[:, 0])
        elif mode == "max":
            masked = token_embeddings.masked_fill(mask == 0, float("-inf"))
            outputs.append(masked.max(dim=1).values)
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            summed = (token_embeddings * mask).sum(dim=1)
            count = torch.clamp(mask.sum(dim=1), min=1e-9)  # (batch, 1)
            outputs.append(summed / (count if mode == "mean" else torch.sqrt(count)))
        elif mode == "weightedmean":
            positions = torch.arange(1, token_embeddings.shape[1] + 1, dtype=token_embeddings.dtype)
            weights = mask * positions.view(1, -1, 1)  # (batch, seq, 1)
            summed = (token_embeddings * weights).sum(dim=1)
            outputs.append(summed / torch.clamp(weights.sum(dim=1), min=1e-9))
        elif mode == "lasttoken":
            last = attention_mask.to(torch.int64).sum(dim=1) - 1  # (batch,)
            last = torch.clamp(last, min=0)
            index = last.view(-1, 1, 1).expand(-1, 1, token_embeddings.shape[-1])
            outputs.append(torch.gather(token_embeddings * mask, 1, index).squeeze(1))
        else:
            raise ConfigError(f"Unknown pooling mode {mode!r}")
    return torch.cat(outputs, dim=-1)


class Dense(nn.Module):
    def __init__(self, config: DenseConfig):
        super().__init__()
        self.linear = nn.Linear(config.in_features, config.out_features, bias=config.bias)
        self.activation = _ACTIVATIONS[config.activation]()
        self.use_residual = config.use_residual
        if config.use_residual and config.in_features != config.out_features:
            self.residual = nn.Linear(config.in_features, config.out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.activation(self.linear(x))
        if self.use_residual:
            out = out + (self.residual(x) if hasattr(self, "residual") else x)
        return out


def load_dense(folder: Path, config: DenseConfig) -> Dense:
    from safetensors.torch import load_file

    path = folder / config.path / "model.safetensors"
    if not path.is_file():
        if (folder / config.path / "pytorch_model.bin").is_file():
            raise UnsafeModelError(
                f"{path.parent} has only pytorch_model.bin (pickle); safetensors weights are required")
        raise ConfigError(f"Dense module weights not found: {path}")
    dense = Dense(config)
    state = load_file(str(path))
    try:
        dense.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ConfigError(f"{path} does not match its config ({config}): {err}") from err
    return dense.float().eval()


class EmbeddingPipeline(nn.Module):
    """encoder -> pooling -> Dense* -> Normalize; returns (sentence_embedding, token_embeddings)."""

    def __init__(self, encoder: nn.Module, config: PipelineConfig, dense: list[Dense], uses_token_type_ids: bool):
        super().__init__()
        self.encoder = encoder
        self.pooling = config.pooling
        self.dense = nn.ModuleList(dense)
        self.normalize = config.normalize
        self.uses_token_type_ids = uses_token_type_ids

    task_config: dict = {}  # the runtime config's task section: the embedding task has none

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.uses_token_type_ids and token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        token_embeddings = self.encoder(**kwargs).last_hidden_state  # (batch, seq, hidden)
        embedding = pool(token_embeddings, attention_mask, self.pooling)  # (batch, hidden)
        for layer in self.dense:
            embedding = layer(embedding)
        if self.normalize:
            embedding = nn.functional.normalize(embedding, p=2, dim=-1)
        return embedding, token_embeddings


def build_embedding_module(encoder: nn.Module, prepared) -> EmbeddingPipeline:
    """The embedding task's torch module (tasks/embedding.py names it): ``encoder`` with the model's pooling,
    Dense layers and normalisation, as ``prepared`` (export/pipeline.py PreparedExport) loaded them."""
    return EmbeddingPipeline(encoder, prepared.resolved.pipeline, prepared.dense, prepared.uses_token_type_ids).eval()
