"""Exceptions vsink raises for problems a user can fix."""


class VsinkError(Exception):
    """A problem with the user's input (model spec, file, option), stated plainly."""


class ModelSpecError(VsinkError):
    """A model spec that cannot be parsed or loaded."""


class ImageError(VsinkError):
    """An image file that cannot be read."""


class VsinkWarning(UserWarning):
    """Something a user should know that does not stop the work; the command line prints it as
    one ``vsink: warning: ...`` line."""
