"""The one exception type users see."""


class EdgeDSError(Exception):
    """A problem with the user's input (a file, a field, an option).

    The CLI prints its message on one line and exits non-zero without a traceback,
    so the message must name the file or field and say what is wrong with it.
    """
