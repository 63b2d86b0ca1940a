"""The Responses API's memory: responses created with `store` (the default), kept so that a later request can
continue from one (`previous_response_id`) or fetch it (GET /v1/responses/{id}). In memory only, bounded twice:
at most `max_items` responses and `max_bytes` of their text (the response object and the conversation it
ended), least recently used first out. Used only from the event loop (no lock needed)."""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from runner.engine.types import ChatMessage

DEFAULT_ITEMS = 1000
DEFAULT_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class StoredResponse:
    response: dict[str, Any]                 # the response object, as GET /v1/responses/{id} returns it
    conversation: tuple[ChatMessage, ...]    # every turn up to and including this response's output
    size: int                                # bytes counted against the store's limit


def _size(response: dict[str, Any], conversation: tuple[ChatMessage, ...]) -> int:
    n = len(json.dumps(response, ensure_ascii=False).encode())
    for m in conversation:
        n += 64 + len(m.content.encode()) + sum(len(c.id) + len(c.name) + len(c.arguments.encode())
                                                for c in m.tool_calls)
    return n


class ResponseStore:
    def __init__(self, max_items: int = DEFAULT_ITEMS, max_bytes: int = DEFAULT_BYTES):
        if max_items < 0 or max_bytes < 0:
            raise ValueError("the response store's limits must be 0 or more")
        self.max_items, self.max_bytes = max_items, max_bytes
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, rid: str, response: dict[str, Any], conversation: tuple[ChatMessage, ...]) -> bool:
        """Keep a response (evicting the least recently used ones to make room); False when it alone is larger
        than the whole store (then it is not kept)."""
        item = StoredResponse(response, conversation, _size(response, conversation))
        self.delete(rid)
        if item.size > self.max_bytes or self.max_items == 0:
            return False
        while self._items and (len(self._items) >= self.max_items or self.bytes + item.size > self.max_bytes):
            _, old = self._items.popitem(last=False)
            self.bytes -= old.size
        self._items[rid] = item
        self.bytes += item.size
        return True

    def get(self, rid: str) -> StoredResponse | None:
        item = self._items.get(rid)
        if item is not None:
            self._items.move_to_end(rid)
        return item

    def delete(self, rid: str) -> bool:
        item = self._items.pop(rid, None)
        if item is None:
            return False
        self.bytes -= item.size
        return True
