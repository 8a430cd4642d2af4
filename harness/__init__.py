"""ltr-harness: train and evaluate long-tailed recognition methods under one protocol."""

__version__ = "0.1.0"


class HarnessError(Exception):
    """An error the user can fix; the CLI prints it as one line and exits non-zero."""
