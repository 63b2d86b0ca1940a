"""The per-request text pipeline: UTF-8 split across tokens, stop strings never leaked in part."""

from __future__ import annotations

import asyncio
import threading

from runner.engine.generation import GenerationHandle, StopText, completion


def test_utf8_split_across_pieces_is_held_until_complete():
    s = StopText(())
    e = "é".encode()           # two bytes
    assert s.feed(b"caf" + e[:1]) == ("caf", False)
    assert s.feed(e[1:] + b"!") == ("é!", False)
    assert s.flush() == ""


def test_incomplete_utf8_at_the_end_becomes_a_replacement_char():
    s = StopText(())
    assert s.feed("€".encode()[:2]) == ("", False)
    assert s.flush() == "\ufffd"


def test_partial_stop_is_held_back_then_released():
    s = StopText(("</end>",))
    assert s.feed(b"hello </e") == ("hello ", False)
    assert s.feed(b"xtra") == ("</extra", False)
    assert s.feed(b" and </en") == (" and ", False)
    assert s.feed(b"d> tail") == ("", True)
    assert s.text == "hello </extra and "


def test_earliest_of_several_stops_wins():
    s = StopText(("STOP", "\n\n"))
    assert s.feed(b"a\n\nb STOP") == ("a", True)
    assert s.matched == "\n\n"      # what Anthropic's stop_sequence reports


def test_matched_is_none_until_a_stop_ends_the_text():
    s = StopText(("STOP",))
    assert s.feed(b"no stop ST") == ("no stop ", False) and s.matched is None
    assert s.feed(b"OP") == ("", True) and s.matched == "STOP"


def test_flush_releases_a_held_prefix_when_generation_ends():
    s = StopText(("###",))
    assert s.feed(b"x ##") == ("x ", False)
    assert s.flush() == "##"
    assert s.text == "x ##"


def _done(h, text="ab"):
    h.finish(completion(text, "stop", prompt_tokens=1, completion_tokens=2, cached_tokens=0, ttft=0.1, decode_tps=1))


def test_generation_sync_and_async_iteration_across_threads():
    h = GenerationHandle(lambda g: None)

    def produce():
        for c in "ab":
            h.push(c)
        _done(h)

    async def consume():
        t = threading.Thread(target=produce)
        t.start()
        out = [d async for d in h]
        t.join()
        return out

    assert asyncio.run(consume()) == ["a", "b"]
    assert list(h) == ["a", "b"]           # a second consumer sees everything too
    assert h.result().text == "ab"


def test_cancel_calls_back_once_and_not_after_finish():
    calls = []
    h = GenerationHandle(calls.append)
    h.cancel()
    h.cancel()
    assert calls == [h] and h.cancelled
    h2 = GenerationHandle(calls.append)
    _done(h2)
    h2.cancel()
    assert calls == [h]


def test_result_timeout():
    import pytest

    with pytest.raises(TimeoutError):
        GenerationHandle(lambda g: None).result(timeout=0.01)
