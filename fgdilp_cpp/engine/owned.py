"""One lifetime rule for everything that owns a llama.cpp object."""

from __future__ import annotations


class Owned:
    """close() frees the object once (subclasses implement _free and set self._open = True once
    they own something); a context manager; garbage collection closes as a last resort."""

    _open = False

    def _free(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if self._open:
            self._open = False
            self._free()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()
