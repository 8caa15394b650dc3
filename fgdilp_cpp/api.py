"""The embeddable Python API: one Detoxifier per model file.

Thread-safety: a Detoxifier owns one set of llama.cpp contexts and is not safe to use from two
threads at once; use one object per thread (they can share nothing but the files). The one
exception is cancel(), which may be called from any thread while generate() or stream() runs.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator, Optional

from .errors import FgdilpError
from .generation import GenResult
from .settings import Settings


class Detoxifier:
    """A GGUF model with steering: generate(prompt) -> GenResult, stream(prompt) -> text pieces."""

    def __init__(self, settings: Settings, vectors_path: Optional[str] = None):
        from .engine import Model
        from .generation import Generator
        from .method.vectors import HeadDirections
        from .models import resolve_model

        self.settings = settings
        self.model = Model(resolve_model(settings.model), n_gpu_layers=settings.n_gpu_layers)
        try:
            vectors = HeadDirections.load(vectors_path) if vectors_path else None
            self._gen = Generator(self.model, settings.engine(), settings.steer(), settings.fgdilp(), vectors=vectors)
        except Exception:
            self.model.close()
            raise

    @classmethod
    def from_file(cls, path: Optional[str] = None, vectors: Optional[str] = None, **settings) -> "Detoxifier":
        """path None = the embedded default model; settings are Settings fields (method="fgdilp", ...)."""
        return cls(Settings(model=None if path is None else str(path)).updated(settings), vectors)

    def _args(self, overrides: dict) -> tuple[Settings, str]:
        s = self.settings.updated(overrides) if overrides else self.settings
        if overrides.keys() - {"method", "n_predict", "seed", "temp", "top_k", "top_p", "min_p"}:
            raise FgdilpError("per-call settings are limited to method, n_predict and sampling; "
                              "create another Detoxifier for other settings")
        return s, ("vectors" if self._gen.vectors is not None else s.method)

    def generate(self, prompt: str, explain: bool = False, **overrides) -> GenResult:
        """The continuation of `prompt` (text in .text, explain data in .explain)."""
        s, method = self._args(overrides)
        return self._gen.generate(prompt, method, s.n_predict, s.sampling(), explain=explain)

    def stream(self, prompt: str, **overrides) -> Iterator[str]:
        """Text pieces of the continuation as they are produced (a worker thread decodes)."""
        s, method = self._args(overrides)
        pieces: queue.Queue = queue.Queue()
        done = object()
        failure: list[BaseException] = []

        def work() -> None:
            try:
                self._gen.generate(prompt, method, s.n_predict, s.sampling(), on_text=pieces.put)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                failure.append(exc)
            finally:
                pieces.put(done)

        worker = threading.Thread(target=work, name="fgdilp-stream", daemon=True)
        worker.start()
        try:
            while (item := pieces.get()) is not done:
                yield item
        finally:
            if worker.is_alive():        # the consumer stopped early: stop the decode too
                self._gen.cancel()
            worker.join()
        if failure:
            raise failure[0]

    def cancel(self) -> None:
        """Stop the running generate()/stream() (from any thread); its text so far is kept."""
        self._gen.cancel()

    def close(self) -> None:
        self._gen.close()
        self.model.close()

    def __enter__(self) -> "Detoxifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
