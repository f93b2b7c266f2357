"""Store events (``BlockEvent``: stored / removed, per tier) for the router's global block index.

Events are kept in a bounded deque (``drain_events``) and handed to subscribers. Subscribers
are always called with no store lock held, on the thread that caused the event (a caller of
``put``/``load``, the disk writer thread, or a prefetch thread); they must be quick and must not
raise (an exception is logged and swallowed).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence

from kvstore.keys import BlockHash
from proto.vocab import EventKind, Tier
from proto.worker_api import BlockEvent

logger = logging.getLogger(__name__)

EventListener = Callable[[BlockEvent], None]
# How a tier reports an event: ``publish(kind, tier, block_hashes)`` (EventBus.publish).
PublishFn = Callable[[EventKind, Tier, Sequence[BlockHash]], None]


class EventBus:
    """Bounded event log plus subscriber callbacks (called outside the bus lock)."""

    def __init__(self, max_events: int = 65536) -> None:
        if max_events <= 0:
            raise ValueError("max_events must be positive")
        self._lock = threading.Lock()
        self._events: deque[BlockEvent] = deque(maxlen=max_events)
        self._subscribers: list[EventListener] = []
        self.num_dropped = 0  # events pushed out of the deque before anyone drained them

    def subscribe(self, callback: EventListener) -> None:
        with self._lock:
            self._subscribers.append(callback)

    def unsubscribe(self, callback: EventListener) -> None:
        with self._lock:
            self._subscribers.remove(callback)

    def publish(self, kind: EventKind, tier: Tier, block_hashes: Sequence[BlockHash]) -> None:
        if not block_hashes:
            return
        event = BlockEvent(kind, tier, tuple(block_hashes))
        with self._lock:
            if len(self._events) == self._events.maxlen:
                self.num_dropped += 1
            self._events.append(event)
            subscribers = list(self._subscribers)
        for callback in subscribers:
            try:
                callback(event)
            except Exception:  # a subscriber must never break the store
                logger.exception("store event subscriber %r failed", callback)

    def drain(self) -> list[BlockEvent]:
        with self._lock:
            events = list(self._events)
            self._events.clear()
        return events
