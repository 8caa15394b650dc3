"""The one exception type a user sees: its message is printed as one line by the CLI."""


class FgdilpError(Exception):
    """A clear, user-facing error (bad input, unsupported model, steering that could not run)."""


class ParamError(FgdilpError):
    """A setting out of range. `field` is the Settings field name (`mask_k`); the CLI prints it as
    its flag (`--mask-k`), the server as its JSON field, the API as the field itself."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field} {reason}")
        self.field, self.reason = field, reason


class ContextLengthError(FgdilpError):
    """A prompt or conversation (with its steering prefix and room for the reply) does not fit the context."""


class Cancelled(FgdilpError):
    """A decode was aborted because cancel() was called."""


class ContextFullError(FgdilpError):
    """llama.cpp found no free KV cell for a batch (llama_decode returned 1; nothing was decoded)."""
