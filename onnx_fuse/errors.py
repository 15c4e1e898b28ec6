"""Errors the tool reports to users as one line (the CLI maps them to exit codes)."""


class BadInput(Exception):
    """The input model, inputs file or command line cannot be used (exit code 2)."""


class CheckFailed(Exception):
    """The rewritten model does not agree with the original (exit code 1)."""

    def __init__(self, message: str, check: dict | None = None):
        super().__init__(message)
        self.check = check


def first_line(error: BaseException, limit: int = 300) -> str:
    """An exception as one line of at most `limit` characters, for messages and reasons."""
    text = str(error).strip().splitlines()
    return (text[0][:limit] if text else "") or type(error).__name__
