"""One error family for bonescan.

Every error bonescan raises on purpose derives from :class:`BonescanError`, and its message is
one sentence that says what went wrong and what to do about it, fit to show a user as it is.
The CLI maps the base class to exit status 2 in one place; pages show the message in an alert.
Python's own errors (a bug) are not in the family and keep their tracebacks.

The few kinds below say what the caller can do; modules subclass them for their own cases
(e.g. ``ManifestError(InputError)``) so that a catch can be as broad or as narrow as it needs.
"""

from __future__ import annotations


class BonescanError(Exception):
    """Base of every error bonescan raises on purpose; ``str(error)`` says what to do."""


class InputError(BonescanError, ValueError):
    """The user's input (a file, a CSV row, an option, a name) is wrong; correcting it fixes this."""


class NotFound(BonescanError, LookupError):
    """Something named by id (a run, an image, a study) does not exist in this database."""


class Unavailable(BonescanError, RuntimeError):
    """A resource is missing or unusable (weights, a model file, the database); the message names it."""


class Conflict(BonescanError):
    """The action clashes with the stored state (a run already queued, an id already used)."""


class PermissionDenied(BonescanError):
    """The signed-in account lacks the role the action needs."""


class RunNotFound(NotFound):
    """No run with this id."""


class ImageNotFound(NotFound):
    """No image with this id."""


class DatabaseUnavailable(Unavailable):
    """The database file cannot be opened, read or written (read-only, corrupted, not SQLite)."""
