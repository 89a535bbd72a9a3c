"""The event loop a daemon process runs on: uvloop by default, asyncio's own when
``DISPATCHER_UVLOOP`` is off; and the pace of its garbage collector.

uvloop (libuv under a Cython loop) spends less CPU per socket read, write and callback
than asyncio's pure-Python loop, which the dispatcher, CPU-bound in one thread, pays for
every delivery. Everything else (tasks, futures, TaskGroup, signal handlers) is the same
asyncio API.

A delivery allocates many short-lived objects (aiohttp's request and response, futures,
headers, its body and attempt record), most freed at once by reference counting, and a
young collection walks every young object still alive, those of the hundreds of requests
in flight included. CPython's default pace (one every 700 net allocations) made that
often: raising the young threshold to :data:`GC_THRESHOLDS` cut the dispatcher's CPU per
delivery by about 15 % (docs/benchmarks.md, issue 16). The long-lived subscription cache
is frozen out of the collector anyway (:mod:`dispatcher.cache`).

Every process that runs the daemon starts its loop here::

    >>> from dispatcher.settings import Settings
    >>> async def answer() -> str:
    ...     return running()
    >>> run(answer(), Settings.from_env({"DISPATCHER_UVLOOP": "off"}))
    'asyncio'
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from dispatcher.settings import Settings

T = TypeVar("T")

# Young collection every 20,000 allocations (CPython: 700); the older generations at
# their default pace relative to it.
GC_THRESHOLDS = (20_000, 10, 10)


def factory(settings: Settings) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop factory of :class:`asyncio.Runner` for ``settings`` (None: asyncio's)."""
    if not settings.uvloop:
        return None
    import uvloop  # only where it is used: the tools and tests need not load it

    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], settings: Settings) -> T:
    """``asyncio.run(main)`` on the loop ``settings`` choose, with the collector's pace of
    :data:`GC_THRESHOLDS`."""
    before = gc.get_threshold()
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        with asyncio.Runner(loop_factory=factory(settings)) as runner:
            return runner.run(main)
    finally:
        gc.set_threshold(*before)


def running() -> str:
    """The running loop's kind, for the start-up line: ``uvloop`` or ``asyncio``."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"
