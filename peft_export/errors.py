"""Exceptions raised by peft_export.

Every class also inherits the builtin a caller would naturally catch, so
``except ValueError`` and ``except PeftExportError`` both work.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


class PeftExportError(Exception):
    """Base class of every error raised on purpose by peft_export.

    The message speaks to a library caller (keyword arguments, method names). Where the ``peft-export`` command
    reaches the same error through one of its flags, :meth:`in_cli_words` gives the message it prints instead, so
    command-line users read ``--force`` and library users ``force=True``, never both mixed.
    """

    cli_message: str | None = None

    def in_cli_words(self, message: str) -> "PeftExportError":
        """Set what ``peft-export`` prints for this error (its flags instead of keyword arguments); returns self."""
        self.cli_message = message
        return self

    def for_cli(self) -> str:
        return self.cli_message or str(self)


class ConfigError(PeftExportError, ValueError):
    """A model, adapter or Sentence Transformers config is missing, malformed or unsupported."""


class UnsafeModelError(PeftExportError, ValueError):
    """A model or adapter asks for something we refuse to do (pickle weights, remote code, odd paths)."""


class ModelNotFoundError(PeftExportError, FileNotFoundError):
    """A model id names neither a local folder nor a reachable Hugging Face Hub repository."""


class ValidationError(PeftExportError, ValueError):
    """The exported graph does not reproduce the PyTorch reference within tolerance."""


class AdapterNotFoundError(PeftExportError, ValueError):
    """An adapter name that the model has not loaded (ValueError, as in PEFT and transformers)."""


class MissingDependencyError(PeftExportError, ImportError):
    """An optional dependency is needed for this call; the message names the extra to install."""


class OutputExistsError(PeftExportError, FileExistsError):
    """The output folder exists and overwriting was not requested."""


class OutputError(PeftExportError, OSError):
    """An output cannot be written (no space, read-only, not a folder, no permission); names the path and the fix."""


class InvalidInputError(PeftExportError, ValueError):
    """A text passed to encode() that cannot be tokenized (e.g. a lone UTF-16 surrogate); names its index."""


class NonFiniteEmbeddingError(PeftExportError, FloatingPointError):
    """The model produced NaN or Inf for some input: corrupt weights or an adapter that overflows. Never returned
    as an embedding."""


class InputError(PeftExportError, ValueError):
    """A corpus to embed is missing, unreadable, empty, or has a missing column or a value that is not text."""


class ListenError(PeftExportError, OSError):
    """The server cannot listen where it was asked to: the port is in use, the address is not this machine's, or
    the port needs privileges."""


class ToolError(PeftExportError, RuntimeError):
    """A library that peft_export drives (a quantizer, for one) failed on this model."""


@contextmanager
def tool_step(what: str) -> Iterator[None]:
    """Turn a third-party library's failure inside the block into a ToolError naming the step, so the CLI reports
    it as one line instead of a traceback from deep inside that library."""
    try:
        yield
    except PeftExportError:
        raise
    except Exception as err:
        raise ToolError(f"{what} failed on this model: {type(err).__name__}: {err}") from err


def require(module: str, extra: str):
    """Import an optional module, or raise MissingDependencyError naming the extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependencyError(
            f"{module!r} is required for this operation but is not installed. "
            f"Install it with: pip install 'peft_export[{extra}]'"
        ) from err
