"""DataPlane.stream on its own, without gRPC: answers in frame order, at most
STREAM_WINDOW frames in flight, the frame named in errors, and cancellation of the
frames nobody will answer."""
from __future__ import annotations

import asyncio
from contextlib import aclosing

import pytest

from service.errors import InvalidArgument, Unavailable
from service.gateway.dataplane import Answer, DataPlane, Frame
from service.pipelines.common import ImageInput


class _Plane(DataPlane):
    """Only `run` is replaced: frame i takes longer the earlier it is, so frames finish
    out of order; a frame whose image is b"bad" fails with InvalidArgument; a frame of
    model "stuck" runs until cancelled."""

    def __init__(self):
        self.running = 0
        self.most_running = 0
        self.cancelled = 0

    async def run(self, task, model, version, images, request, timeout_s):
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await asyncio.sleep(60 if model == "stuck" else 0.01 * (5 - int(model) % 5))
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1
        if images[0].encoded == b"bad":
            raise InvalidArgument("images[0].encoded", "corrupt")
        return Answer(model, str(timeout_s), [])


def _frame(model, data=b"x") -> Frame:
    return Frame(str(model), "", [ImageInput(encoded=data)], {})


async def _frames(frames, error: Exception | None = None):
    for frame in frames:
        yield frame
    if error is not None:
        raise error


def test_answers_in_frame_order_within_the_window():
    plane = _Plane()

    async def main():
        return [a.model async for a in plane.stream(None, _frames([_frame(i) for i in range(10)]), lambda: 7.0)]

    assert asyncio.run(main()) == [str(i) for i in range(10)]
    assert 1 < plane.most_running <= DataPlane.STREAM_WINDOW


def test_each_frame_reads_its_own_deadline():
    deadlines = iter([3.0, 2.0, 1.0])

    async def main():
        return [a.version async for a in _Plane().stream(
            None, _frames([_frame(i) for i in range(3)]), lambda: next(deadlines))]

    assert asyncio.run(main()) == ["3.0", "2.0", "1.0"]


def test_bad_frame_is_named_after_the_earlier_answers():
    async def main():
        got = []
        with pytest.raises(InvalidArgument) as info:
            async for answer in _Plane().stream(
                    None, _frames([_frame(0), _frame(1), _frame(2, b"bad"), _frame(3)]), lambda: None):
                got.append(answer.model)
        return got, info.value

    got, error = asyncio.run(main())
    assert got == ["0", "1"]
    assert error.field == "frames[2].images[0].encoded" and error.description == "corrupt"


def test_failing_source_ends_the_stream_in_its_turn():
    async def main():
        got = []
        with pytest.raises(Unavailable, match="source gone"):
            async for answer in _Plane().stream(
                    None, _frames([_frame(0), _frame(1)], Unavailable("source gone")), lambda: None):
                got.append(answer.model)
        return got

    assert asyncio.run(main()) == ["0", "1"]


def test_closing_the_stream_cancels_its_frames():
    plane = _Plane()

    async def main():
        frames = _frames([_frame(0)] + [_frame("stuck")] * 6)
        async with aclosing(plane.stream(None, frames, lambda: None)) as answers:
            assert (await anext(answers)).model == "0"
            for _ in range(100):  # let the window fill
                if plane.running >= DataPlane.STREAM_WINDOW - 1:
                    break
                await asyncio.sleep(0.01)
        await asyncio.sleep(0)  # the cancelled frames unwind
        return plane.running, plane.cancelled

    running, cancelled = asyncio.run(main())
    assert running == 0 and cancelled >= 2
