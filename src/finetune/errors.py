"""Errors a user can cause, each carrying one clear message.

Every error raised for bad input (a folder, a file, an option, a missing weights file) is a
`FinetuneError`, so the CLI can print its message and exit without a traceback, and Python callers
can catch one type.
"""

from __future__ import annotations


class FinetuneError(Exception):
    """Base class for errors caused by the user's input or environment."""


class DataError(FinetuneError):
    """The data folder cannot be used as given (no images, an empty class, one class...)."""


class ImageDecodeError(FinetuneError):
    """One image file could not be decoded into an RGB image.

    Args:
        path: the file that failed.
        reason: a short human-readable reason ("truncated file", "not an image", ...).
    """

    def __init__(self, path, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class WeightsError(FinetuneError):
    """Pretrained weights are missing, unreadable or refused as unsafe."""


class ConfigError(FinetuneError):
    """A configuration key, option or value is not valid."""


class NonFiniteLossError(FinetuneError):
    """Training stopped: the loss (or the weights) became NaN or infinite.

    Args:
        message: what happened, the batch's files, and where the last good weights are.
        files: the training files of the batch where it happened.
        checkpoint: the last complete checkpoint from before, or None.
    """

    def __init__(self, message: str, files: list[str], checkpoint=None):
        self.files = files
        self.checkpoint = checkpoint
        super().__init__(message)
