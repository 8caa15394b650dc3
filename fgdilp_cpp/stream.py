"""A streamed generation: text pieces as a worker thread decodes them (Detoxifier.stream / stream_chat)."""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator, Optional, Protocol

from .chat import Fitted
from .results import GenResult
from .settings import Settings


class Cancellable(Protocol):
    """What a stream stops its generation with (generation.Generator's public cancel control)."""

    def cancel(self) -> None: ...

    def reset_cancel(self) -> None: ...


class Stream(Iterator[str]):
    """Text pieces as they are produced (an iterator); once exhausted, .result is the GenResult.

    A worker thread decodes; leaving the loop early (break, an exception) cancels the decode.
    run(on_text) runs the generation (api.Detoxifier prepares it: prompt, settings, method),
    keeping a cancel that came before it; control cancels it from any thread."""

    def __init__(self, run: Callable[[Callable[[str], None]], GenResult], control: Cancellable, settings: Settings,
                 method: str, fitted: Optional[Fitted] = None):
        self._run_call, self._control = run, control
        self.settings, self.method = settings, method     # what this generation runs with (chat records it)
        self.fitted = fitted                  # chat: the conversation that was sent (after trimming)
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
        self._control.cancel()

    def close(self) -> None:
        """Stop early: the decode is cancelled and its worker joined."""
        if self._it is not None:
            self._it.close()

    def _run(self) -> Iterator[str]:
        control = self._control
        pieces: queue.Queue = queue.Queue()
        done = object()
        failure: list[BaseException] = []

        def work() -> None:
            try:
                res = self._run_call(pieces.put)
                if self.fitted is not None:
                    res.explain["dropped_messages"] = self.fitted.dropped
                self.result = res
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                failure.append(exc)
            finally:
                pieces.put(done)

        control.reset_cancel()            # here, so that a cancel() from now on is never lost
        if self._cancel_asked:            # ... and one that came before is kept (set before, read after)
            control.cancel()
        worker = threading.Thread(target=work, name="fgdilp-stream", daemon=True)
        worker.start()
        try:
            while (item := pieces.get()) is not done:
                yield item
        finally:
            if worker.is_alive():         # the consumer stopped early: stop the decode too
                control.cancel()
            worker.join()
        if failure:
            raise failure[0]
