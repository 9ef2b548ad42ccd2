"""The one exception type users see.

Every failure a user can cause (bad checkpoint, bad option, impossible request) raises `TandemcError` with a
one-line message that names the problem and what to do. The CLI prints it and exits with status 2.
"""


class TandemcError(Exception):
    """A user-facing error; its message is a single line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
