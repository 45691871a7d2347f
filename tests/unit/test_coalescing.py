"""The ingress's coalescer (serve_app/coalescing.py) against a fake encoder, no Ray: rows per request and their
order, the bound on calls in flight, a lone request sent at once, cancellation, failures that stay one
request's, and ClipService's text path through it (token counts, Ray's refusals)."""

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from serve_app.coalescing import Coalescer, concat_rows
from serve_app.config import BatchSettings
from serve_app.errors import Overloaded
from serve_app.inputs import TextInput
from serve_app.serving import ClipService, ServedModel

BAD = -1  # a row holding this fails every call it is in


class FakeEncoder:
    """Vectors are the rows' first column times 10 (so each row says whose it is); while `hold`, calls wait for
    `release` or `open`; any call holding a BAD row fails."""

    def __init__(self, hold: bool = False, error: Exception | None = None) -> None:
        self.calls: list[list[int]] = []  # each call's rows (first column)
        self.cancelled = 0
        self.hold = hold
        self.gate = asyncio.Event()
        self.error = error

    def release(self) -> None:
        """The calls waiting now return; later ones wait again."""
        gate, self.gate = self.gate, asyncio.Event()
        gate.set()

    def open(self) -> None:
        """Every call returns, now and later."""
        self.hold = False
        self.gate.set()

    async def __call__(self, rows: torch.Tensor) -> np.ndarray:
        self.calls.append(rows[:, 0].tolist())
        try:
            if self.hold:
                await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.error is not None:
            raise self.error
        if (rows == BAD).any():
            raise RuntimeError("the forward pass failed")
        return rows[:, :1].numpy().astype(np.float32) * 10


def rows(*firsts: int, width: int = 3) -> torch.Tensor:
    return torch.tensor([[f] + [7] * (width - 1) for f in firsts], dtype=torch.long)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def firsts(out: np.ndarray) -> list[int]:
    return [int(v) // 10 for v in out[:, 0]]


def run(coro):
    async def bounded():
        return await asyncio.wait_for(coro, 10)

    return asyncio.run(bounded())


def test_a_lone_request_is_sent_at_once():
    async def main():
        encoder = FakeEncoder(hold=True)
        coalescer = Coalescer(encoder, max_in_flight=2, max_rows=64)
        task = asyncio.ensure_future(coalescer(rows(1, 2)))
        await settle()
        assert encoder.calls == [[1, 2]]  # sent before anything else ran
        encoder.open()
        assert firsts(await task) == [1, 2]

    run(main())


def test_past_the_bound_requests_wait_and_go_together_each_getting_its_rows_in_order():
    async def main():
        encoder = FakeEncoder(hold=True)
        coalescer = Coalescer(encoder, max_in_flight=2, max_rows=64)
        tasks = [asyncio.ensure_future(coalescer(rows(*range(10 * i, 10 * i + i + 1)))) for i in range(6)]
        await settle()
        assert encoder.calls == [[0], [10, 11]] and coalescer.in_flight == 2 and coalescer.waiting == 4
        encoder.open()
        results = await asyncio.gather(*tasks)
        assert encoder.calls[2] == [20, 21, 22, 30, 31, 32, 33, 40, 41, 42, 43, 44, 50, 51, 52, 53, 54, 55]
        assert len(encoder.calls) == 3
        for i, out in enumerate(results):
            assert firsts(out) == list(range(10 * i, 10 * i + i + 1))
        assert coalescer.in_flight == 0 and coalescer.waiting == 0

    run(main())


def test_never_more_calls_in_flight_than_the_bound_below_a_full_call():
    async def main():
        in_flight = peak = 0

        async def send(batch):
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(0.001)
            in_flight -= 1
            return batch[:, :1].numpy() * 10

        coalescer = Coalescer(send, max_in_flight=3, max_rows=1000)
        results = await asyncio.gather(*(coalescer(rows(i)) for i in range(200)))
        assert [firsts(r) for r in results] == [[i] for i in range(200)]
        assert peak == 3 and coalescer.calls < 200

    run(main())


def test_rows_worth_a_full_call_do_not_wait_and_no_call_exceeds_max_rows():
    async def main():
        encoder = FakeEncoder(hold=True)
        coalescer = Coalescer(encoder, max_in_flight=1, max_rows=4)
        tasks = [asyncio.ensure_future(coalescer(rows(*r))) for r in ([1], [2, 2], [3, 3], [4, 4], [5, 5, 5])]
        await settle()
        # [1] in flight; [2, 2] + [3, 3] fill a call; [4, 4] then [5, 5, 5] hold 5 >= 4 rows: [4, 4] goes
        assert encoder.calls == [[1], [2, 2, 3, 3], [4, 4]] and coalescer.waiting == 1
        encoder.open()
        await asyncio.gather(*tasks)
        assert encoder.calls[3] == [5, 5, 5]

    run(main())


def test_a_request_larger_than_a_call_goes_alone_and_whole():
    async def main():
        encoder = FakeEncoder(hold=True)
        coalescer = Coalescer(encoder, max_in_flight=1, max_rows=4)
        first = asyncio.ensure_future(coalescer(rows(1)))
        big = asyncio.ensure_future(coalescer(rows(*range(10, 20))))
        small = asyncio.ensure_future(coalescer(rows(2)))
        await settle()
        assert encoder.calls == [[1], list(range(10, 20))]
        encoder.open()
        assert firsts(await big) == list(range(10, 20))
        await asyncio.gather(first, small)
        assert encoder.calls[2] == [2]

    run(main())


def test_a_request_cancelled_while_waiting_is_removed_before_the_call_is_sent():
    async def main():
        encoder = FakeEncoder(hold=True)
        coalescer = Coalescer(encoder, max_in_flight=1, max_rows=64)
        first = asyncio.ensure_future(coalescer(rows(1)))
        gone = asyncio.ensure_future(coalescer(rows(2, 2)))
        stays = asyncio.ensure_future(coalescer(rows(3)))
        await settle()
        gone.cancel()
        await settle()
        assert coalescer.waiting == 1
        encoder.open()
        assert firsts(await stays) == [3]
        await first
        assert encoder.calls == [[1], [3]]
        with pytest.raises(asyncio.CancelledError):
            await gone

    run(main())


def test_a_call_whose_requests_are_all_gone_is_cancelled_and_frees_its_place():
    async def main():
        encoder = FakeEncoder(hold=True)
        coalescer = Coalescer(encoder, max_in_flight=1, max_rows=64)
        first = asyncio.ensure_future(coalescer(rows(1)))
        await settle()
        nxt = asyncio.ensure_future(coalescer(rows(2)))
        await settle()
        first.cancel()
        await settle()
        assert encoder.cancelled == 1 and encoder.calls == [[1], [2]]  # the waiting request went at once
        encoder.open()
        assert firsts(await nxt) == [2]

    run(main())


def test_a_call_goes_on_while_one_of_its_requests_is_still_waiting():
    async def main():
        encoder = FakeEncoder(hold=True)
        coalescer = Coalescer(encoder, max_in_flight=1, max_rows=64)
        first = asyncio.ensure_future(coalescer(rows(1)))
        a = asyncio.ensure_future(coalescer(rows(2)))
        b = asyncio.ensure_future(coalescer(rows(3)))
        await settle()
        encoder.release()
        await first
        await settle()
        assert encoder.calls == [[1], [2, 3]]
        a.cancel()
        await settle()
        assert encoder.cancelled == 0
        encoder.open()
        assert firsts(await b) == [3]

    run(main())


def test_one_bad_request_fails_alone_and_its_neighbours_are_answered():
    async def main():
        encoder = FakeEncoder(hold=True)
        coalescer = Coalescer(encoder, max_in_flight=1, max_rows=64)
        first = asyncio.ensure_future(coalescer(rows(1)))
        good = [asyncio.ensure_future(coalescer(rows(i, i))) for i in (2, 3)]
        bad = asyncio.ensure_future(coalescer(rows(4, BAD)))
        await settle()
        encoder.open()
        assert [firsts(await g) for g in good] == [[2, 2], [3, 3]]
        with pytest.raises(RuntimeError, match="forward pass failed"):
            await bad
        await first
        # the merged call failed, then each of its requests went alone
        assert encoder.calls == [[1], [2, 2, 3, 3, 4, BAD], [2, 2], [3, 3], [4, BAD]]
        assert coalescer.in_flight == 0

    run(main())


def test_a_refusal_of_the_pool_reaches_every_request_of_the_call_without_retries():
    async def main():
        refusal = Overloaded("too many requests are queued")
        encoder = FakeEncoder(hold=True, error=refusal)
        coalescer = Coalescer(encoder, max_in_flight=1, max_rows=64,
                              shared_failure=lambda exc: isinstance(exc, Overloaded))
        tasks = [asyncio.ensure_future(coalescer(rows(i))) for i in range(4)]
        await settle()
        encoder.open()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(r is refusal for r in results)
        assert encoder.calls == [[0], [1, 2, 3]]

    run(main())


def test_a_lone_request_gets_its_call_s_error():
    async def main():
        encoder = FakeEncoder()
        coalescer = Coalescer(encoder, max_in_flight=2, max_rows=64)
        with pytest.raises(RuntimeError):
            await coalescer(rows(BAD))
        assert encoder.calls == [[BAD]] and coalescer.in_flight == 0

    run(main())


def test_zero_in_flight_means_every_request_is_its_own_call():
    async def main():
        encoder = FakeEncoder()
        coalescer = Coalescer(encoder, max_in_flight=0, max_rows=64)
        results = await asyncio.gather(*(coalescer(rows(i)) for i in range(5)))
        assert [firsts(r) for r in results] == [[i] for i in range(5)]
        assert sorted(encoder.calls) == [[i] for i in range(5)]

    run(main())


def test_rows_of_different_widths_are_padded_with_zeros():
    out = concat_rows([torch.ones((1, 2), dtype=torch.long), torch.full((2, 4), 5)])
    assert out.tolist() == [[1, 1, 0, 0], [5, 5, 5, 5], [5, 5, 5, 5]]
    same = torch.ones((2, 3))
    assert concat_rows([same]) is same


# ------------------------------------------------------------------ ClipService's texts through it


class FakeHandleMethod:
    def __init__(self, send) -> None:
        self._send = send

    def remote(self, *args):
        return asyncio.ensure_future(self._send(*args))


def fake_tokenizer(texts: list[str]) -> torch.Tensor:
    """Token ids as open_clip's shape has them: each word's length, then zeros to the context (8)."""
    out = torch.zeros((len(texts), 8), dtype=torch.long)
    for i, text in enumerate(texts):
        lengths = [len(w) for w in text.split()][:8]
        out[i, : len(lengths)] = torch.tensor(lengths)
    return out


def service(send, calls_in_flight: int = 1) -> ClipService:
    encoder = SimpleNamespace(embed_texts=FakeHandleMethod(send))
    model = ServedModel("m", SimpleNamespace(embed_dim=1), encoder, fake_tokenizer,
                        BatchSettings(ingress_calls_in_flight=calls_in_flight))
    return ClipService(preprocessor=None, models={"m": model})


def test_concurrent_text_requests_share_calls_and_keep_their_vectors_and_token_counts():
    async def main():
        encoder = FakeEncoder(hold=True)
        clip = service(encoder)
        texts = [["a bb"], ["ccc", "dddd eeeee ffffff"], ["ggggggg"]]
        model = clip.model("m")
        tasks = [asyncio.ensure_future(clip.embed(model, [TextInput(t, "input") for t in ts])) for ts in texts]
        await settle()
        encoder.open()
        results = await asyncio.gather(*tasks)
        assert encoder.calls == [[1], [3, 4, 7]]
        assert [firsts(r.vectors) for r in results] == [[1], [3, 4], [7]]
        assert [r.prompt_tokens for r in results] == [2, 4, 1]

    run(main())


def test_ray_s_backpressure_refusal_still_becomes_a_429_for_every_waiting_request():
    from ray.serve.exceptions import BackPressureError

    async def main():
        encoder = FakeEncoder(hold=True, error=BackPressureError(num_queued_requests=9, max_queued_requests=8,
                                                                 status_code=429, retry_after_s=1))
        clip = service(encoder)
        model = clip.model("m")
        tasks = [asyncio.ensure_future(clip.embed(model, [TextInput(f"text {i}", "input")])) for i in range(3)]
        await settle()
        encoder.open()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, Overloaded) and r.retry_after_s == 1 for r in results), results
        assert len(encoder.calls) == 2  # no retry one by one

    run(main())
