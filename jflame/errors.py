"""One small exception hierarchy. Every message says what went wrong and what to do about it.

Per-image failures inside a batch never raise out of the batch: they become a status string in the
results (see `jflame.fit`); these exceptions are for the host-side steps that handle one thing.
"""


class JFlameError(Exception):
  """Base class of every error jflame raises on purpose."""


class ModelFileError(JFlameError):
  """A model or asset file is missing, unreadable, or not in the expected format."""


class UnsafePickleError(ModelFileError):
  """A pickle asked for a global that the restricted FLAME unpickler does not allow."""


class ImageReadError(JFlameError):
  """An image file could not be read or decoded."""


class InputError(JFlameError):
  """The input set is empty or names nothing that exists."""


class ConfigError(JFlameError):
  """Settings that do not fit together."""


class OutputError(JFlameError):
  """The output folder cannot be used: not a folder, not writable, or held by another run."""


class IdConflictError(OutputError):
  """A result was about to be recorded under an id that belongs to another source."""
