"""A streamed generation: text pieces as a worker thread decodes them (Detoxifier.stream / stream_chat)."""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterator, Optional

from .chat import Fitted
from .condition import conversation_texts
from .results import GenResult
from .settings import Settings

class Stream(Iterator[str]):
    """Text pieces as they are produced (an iterator); once exhausted, .result is the GenResult.

    A worker thread decodes; leaving the loop early (break, an exception) cancels the decode.
    det: the api.Detoxifier that runs it (not imported here: the API imports this module)."""

    def __init__(self, det: Any, prompt: str, settings: Settings, method: str, special: bool,
                 explain: bool, fitted: Optional[Fitted] = None):
        self._det, self._prompt, self._s, self._method = det, prompt, settings, method
        self.settings, self.method = settings, method     # what this generation runs with (chat records it)
        self._special, self._explain = special, explain
        self.fitted = fitted                  # chat: the conversation that was sent (after trimming)
        self._condition_texts = conversation_texts(fitted.messages) if fitted is not None else None
        self.result: Optional[GenResult] = None
        self._it: Optional[Iterator[str]] = None
        self._cancel_asked = False

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> str:
        if self._it is None:
            self._it = self._run()
        return next(self._it)

    def cancel(self) -> None:
        """Stop this stream from any thread, also before its first piece: unlike Detoxifier.cancel(),
        a cancel that lands before the decode starts (FGDILP's setup included) is kept."""
        self._cancel_asked = True
        self._det._gen.cancel()

    def close(self) -> None:
        """Stop early: the decode is cancelled and its worker joined."""
        if self._it is not None:
            self._it.close()

    def _run(self) -> Iterator[str]:
        det, s = self._det, self._s
        pieces: queue.Queue = queue.Queue()
        done = object()
        failure: list[BaseException] = []

        def work() -> None:
            try:
                res = det._call(self._prompt, s, self._method, self._special, self._explain,
                                on_text=pieces.put, reset_cancel=False, chat=self.fitted is not None,
                                condition_texts=self._condition_texts)
                if self.fitted is not None:
                    res.explain["dropped_messages"] = self.fitted.dropped
                self.result = res
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                failure.append(exc)
            finally:
                pieces.put(done)

        det._gen.reset_cancel()           # here, so that a cancel() from now on is never lost
        if self._cancel_asked:            # ... and one that came before is kept (set before, read after)
            det._gen.cancel()
        worker = threading.Thread(target=work, name="fgdilp-stream", daemon=True)
        worker.start()
        try:
            while (item := pieces.get()) is not done:
                yield item
        finally:
            if worker.is_alive():         # the consumer stopped early: stop the decode too
                det._gen.cancel()
            worker.join()
        if failure:
            raise failure[0]
