"""sentence-transformers' similarity functions (cosine, dot, euclidean, manhattan) in numpy."""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError

SIMILARITY_FUNCTIONS = ("cosine", "dot", "euclidean", "manhattan")


def _as_matrix(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a vector or a (n, dim) matrix, found shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or Inf values; similarities would be meaningless")
    return arr


def _check_dims(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"Embedding dimensions differ: a has {a.shape[1]}, b has {b.shape[1]}")


def normalize(x: np.ndarray) -> np.ndarray:
    """L2-normalise along the last axis. A zero vector stays zero (its norm is clamped at 1e-12), so it has cosine 0
    with everything, as in sentence-transformers."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two (n, dim) matrices."""
    return (a * b).sum(axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def similarity(a, b, fn: str = "cosine") -> np.ndarray:
    """(n, dim), (m, dim) -> (n, m) matrix."""
    a, b = _as_matrix(a, "a"), _as_matrix(b, "b")
    _check_dims(a, b)
    if fn == "cosine":
        return normalize(a) @ normalize(b).T
    if fn == "dot":
        return a @ b.T
    if fn == "euclidean":
        sq = (a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :]
        return -np.sqrt(np.maximum(sq, 0.0))
    if fn == "manhattan":
        return -np.abs(a[:, None, :] - b[None, :, :]).sum(-1)
    raise ConfigError(f"Unknown similarity function {fn!r}; choose one of {', '.join(SIMILARITY_FUNCTIONS)}")


def similarity_pairwise(a, b, fn: str = "cosine") -> np.ndarray:
    """(n, dim), (n, dim) -> (n,) vector of row-wise similarities."""
    a, b = _as_matrix(a, "a"), _as_matrix(b, "b")
    _check_dims(a, b)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"similarity_pairwise needs as many rows in a ({a.shape[0]}) as in b ({b.shape[0]})")
    if fn == "cosine":
        return (normalize(a) * normalize(b)).sum(1)
    if fn == "dot":
        return (a * b).sum(1)
    if fn == "euclidean":
        return -np.sqrt(((a - b) ** 2).sum(1))
    if fn == "manhattan":
        return -np.abs(a - b).sum(1)
    raise ConfigError(f"Unknown similarity function {fn!r}; choose one of {', '.join(SIMILARITY_FUNCTIONS)}")
