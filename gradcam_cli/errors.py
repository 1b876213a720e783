"""The errors a user's own mistakes raise: each becomes one line and exit code 2, which
starts with the program's name as the user typed it (``main.py`` or ``gradcam``)."""

_program = "main.py"


def program() -> str:
    """The name the tool was started as: main.py from a checkout, gradcam once installed."""
    return _program


def set_program(name: str) -> None:
    global _program
    _program = name


class InputError(Exception):
    """A user mistake in the inputs given (images, labels, a model file), with a message
    that says what to do."""


class UsageError(InputError):
    """A mistake on the command line itself (flags that do not fit together, a layer or
    class that does not exist)."""
