"""The one exception type a user sees: its message is printed as one line by the CLI."""


class FgdilpError(Exception):
    """A clear, user-facing error (bad input, unsupported model, steering that could not run)."""


class ContextLengthError(FgdilpError):
    """A prompt or conversation (with its steering prefix and room for the reply) does not fit the context."""


class Cancelled(FgdilpError):
    """A decode was aborted because cancel() was called."""
