"""The project's error types, in one module that every layer may import.

* :class:`DataError` — bad input or usage (unreadable file, mask of another size, unknown
  option); the message names the file or setting and says what to do. The command line
  turns it into one line on stderr and exit status 2.
* :class:`ModelUnavailableError` — pretrained weights are not available here (offline,
  not cached); the message says how to provide them.
* :class:`ModelLoadError` — a CLIP model's config or weights cannot be loaded for training.
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data. The message names the file and says what to do."""


class ModelUnavailableError(DataError):
    """Pretrained weights are not available here; the message says how to provide them."""


class ModelLoadError(ModelUnavailableError):
    """A model (config or weights) cannot be loaded; the message says how to provide it."""
