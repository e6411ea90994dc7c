"""The bridge between a request's coroutine and the scheduler thread: a `Run` submits a task and
hands its events (start, forced text, tokens, the end) back through an asyncio queue."""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from ..sampling import SamplingParams
from .scheduler import Scheduler, Task


class Run:
    """One submitted generation. Iterate `events()` for (kind, value) pairs up to the final
    "done", "error" or "cancelled"; `cancel()` stops it at the scheduler's next step."""

    def __init__(self, scheduler: Scheduler, tokens: list[int], sampling: dict, forced: list[int] | None = None,
                 forced_text: str = "", force_after: list[int] | None = None):
        self.loop = asyncio.get_running_loop()
        self.items: asyncio.Queue = asyncio.Queue()
        self.scheduler = scheduler
        params = SamplingParams(temperature=sampling["temperature"], top_k=sampling["top_k"],
                                top_p=sampling["top_p"], min_p=sampling["min_p"],
                                repeat_penalty=sampling["repeat_penalty"], seed=sampling["seed"])
        stop = sampling.get("stop")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        self.task = Task(tokens=list(tokens), max_tokens=sampling["max_tokens"], params=params, stop=stops,
                         emit=self._emit, forced=list(forced or []), forced_text=forced_text,
                         force_after=force_after)
        self.ended = False

    def _emit(self, kind: str, value: Any) -> None:          # on the scheduler thread
        try:
            self.loop.call_soon_threadsafe(self.items.put_nowait, (kind, value))
        except RuntimeError:                                 # the loop is closed: nobody listens
            self.task.cancel.set()

    def submit(self) -> "Run":
        self.scheduler.submit(self.task)                     # QueueFull / prompt errors raise here
        return self

    def cancel(self) -> None:
        if not self.ended:
            self.task.cancel.set()
            self.scheduler.wake()

    async def next(self) -> tuple[str, Any]:
        kind, value = await self.items.get()
        if kind in ("done", "error", "cancelled"):
            self.ended = True
        return kind, value

    async def events(self) -> AsyncIterator[tuple[str, Any]]:
        while not self.ended:
            yield await self.next()
