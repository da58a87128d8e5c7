"""effnet's error types: every failure a user can cause raises one of these, with a message that says what to do."""


class EffnetError(Exception):
    """Base class of every error effnet raises on purpose."""


class UnknownModelError(EffnetError, KeyError):
    """A model or handle name that effnet does not know."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class WeightsError(EffnetError):
    """Weights that do not fit the model: missing, unexpected or mis-shaped variables."""


class CheckpointFormatError(EffnetError):
    """A weights file whose bytes are not the format they claim to be (corrupt, truncated, hostile)."""


class DownloadError(EffnetError):
    """A download that failed, did not verify, or cannot happen offline."""
