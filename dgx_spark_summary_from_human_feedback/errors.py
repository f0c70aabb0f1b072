"""The one error type a user sees: `cli.run` prints its message as one line and exits 1."""


class InputError(ValueError):
    """Bad user input: the message is one line naming the row/field/path and what to do."""
