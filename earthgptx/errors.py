"""Typed errors. Every message says what was wrong and what to do about it."""


class EarthGPTXError(Exception):
    """Base class of the project's own errors."""


class InputError(EarthGPTXError, ValueError):
    """Bad user input: an unreadable image, a wrong modality, a prompt outside the image."""


class CheckpointError(EarthGPTXError):
    """A checkpoint folder or a weights file that cannot be used."""
