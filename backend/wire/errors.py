"""Errors that carry a message meant for the user (CLI, wire, Blender operator)."""


class SpatialAvatarError(Exception):
    """Base class: the message says what was wrong and what to do."""


class InputError(SpatialAvatarError, ValueError):
    """A file, argument or message from outside was malformed."""


class HeadModelError(SpatialAvatarError):
    """A head model could not be found or loaded."""
