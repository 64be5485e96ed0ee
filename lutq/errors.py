"""User-facing errors: the CLI prints their message as one line and exits with code 2."""


class LutqError(Exception):
    """An error caused by the user's input (a file, an argument), not by a bug in lutq."""


class CheckpointError(LutqError):
    """A checkpoint cannot be read: missing, malformed, truncated or unsupported."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
