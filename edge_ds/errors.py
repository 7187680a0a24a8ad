"""The exception types users see."""

from __future__ import annotations


class EdgeDSError(Exception):
    """A problem with the user's input (a file, a field, an option).

    The CLI prints its message on one line and exits non-zero without a traceback,
    so the message must name the file or field and say what is wrong with it.
    """


class OptionError(EdgeDSError):
    """A bad value of a named option of a library call.

    The message names the option by its argument name (`top_p`); a front end renders the same
    message with its own spelling of the option: the CLI its flag (`--top-p`), the server its
    JSON field. `template` holds the message with "{option}" where the name goes.
    """

    def __init__(self, option: str, template: str):
        self.option = option
        self.template = template
        super().__init__(self.spelled(option))

    def spelled(self, name: str) -> str:
        """The message with the option called `name`."""
        return self.template.replace("{option}", name)


class ContextLengthError(EdgeDSError):
    """The prompt plus the tokens asked for do not fit the model's context window."""
