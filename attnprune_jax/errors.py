"""The exceptions of bad input, kept apart from bugs.

Every check of a user's input (an argument, an option, a file, a setting that makes the solver
diverge) raises an `InputError`; the `attnprune` command reports these in one line and exits with
status 2. Any other exception is a bug and keeps its traceback. The subclasses also derive from
the built-in type a caller would expect (`TypeError`, `FileNotFoundError`), so `except TypeError`
still catches a wrongly typed argument.
"""


class InputError(ValueError):
  """Bad input: the message names the argument (or file, or option) and what was expected.

  `argument` is the name of the argument or setting at fault where one is (e.g. "sparsity"),
  so that a command can name its own option for it instead.
  """

  def __init__(self, message: str, *, argument: str | None = None):
    super().__init__(message)
    self.argument = argument


class InputTypeError(InputError, TypeError):
  """An argument of the wrong type."""


class MissingFileError(InputError, FileNotFoundError):
  """A file the input names does not exist (the message says how to get it, where it can)."""


class OutputExistsError(InputError, FileExistsError):
  """An output the input names exists already and would be overwritten."""


class DivergenceError(InputError):
  """The solver's loss or mask became non-finite: the step size (or λ) is too large."""
