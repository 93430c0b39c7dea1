"""One small exception hierarchy. Messages name the offending value and the fix."""


class L3MuscleSegError(Exception):
    """Base class of every error the library raises on purpose."""


class InputError(L3MuscleSegError):
    """An input file, array or parameter cannot be used as given."""


class ModelError(L3MuscleSegError):
    """A model folder is missing, incomplete or incompatible."""


class CancelledError(L3MuscleSegError):
    """The caller asked a long job to stop."""
