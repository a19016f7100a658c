"""Errors a user can act on. Each message names the thing at fault and, where there is one, the fix."""


class TilerunError(Exception):
    """Base class of errors meant for the user, shown without a traceback by the CLI."""


class ConfigError(TilerunError, ValueError):
    """A configuration field is missing, has the wrong type, or contradicts another field."""


class CheckpointError(TilerunError, ValueError):
    """A checkpoint lacks a tensor, has one of the wrong shape, or cannot be read safely."""


class CapacityError(TilerunError, ValueError):
    """A request does not fit a limit of the model or of the KV cache."""
