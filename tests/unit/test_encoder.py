"""The encoder's batches without a batch wait (the default): the real ClipEncoder and Ray's `@serve.batch`,
outside Ray, on a tiny model whose forward pass the test holds open. No timing: the second batch's
callers are counted at the gate before the first pass is let go."""

import asyncio
import threading
from types import SimpleNamespace

import pytest
import torch
from ray.serve import batching

from serve_app.config import ModelSpec
from serve_app.encoder import ClipEncoder


@pytest.fixture(autouse=True)
def _outside_a_replica(monkeypatch):
    """`@serve.batch` reads the replica's `max_ongoing_requests` (for a warning only) when its queue starts.

    Ray keeps that queue in the decorated method, one per process: the ones this test starts are dropped
    after it, or ClipEncoder (and the subclasses other tests ship to Serve by value) would no longer pickle.
    """
    context = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=256))
    monkeypatch.setattr(batching.serve, "get_replica_context", lambda: context)
    queues = [method.set_max_batch_size.__self__ for method in (ClipEncoder.func_or_class._image_batch,
                                                                 ClipEncoder.func_or_class._text_batch)]
    yield
    for queue in queues:
        queue._queue = None


def _encoder(tiny_model_dir):
    encoder = ClipEncoder.func_or_class(ModelSpec(model=f"local-dir:{tiny_model_dir}", torch_threads=1))
    encoder.reconfigure({})  # the defaults, as the replica gets them through user_config
    assert encoder.info()["batching"]["text_batch_wait_timeout_s"] == 0.0
    passes: list[int] = []  # rows of each forward pass
    started, go_on = threading.Event(), threading.Event()  # a pass has begun; it may finish
    forward = encoder._core.encode_texts

    def held_forward(tokens: torch.Tensor):
        passes.append(len(tokens))
        started.set()
        go_on.wait(30)
        return forward(tokens)

    encoder._core.encode_texts = held_forward
    return encoder, passes, started, go_on


def _tokens(rows: int) -> torch.Tensor:
    tokens = torch.zeros((rows, 77), dtype=torch.long)
    tokens[:, :3] = torch.tensor([49406, 320, 49407])
    return tokens


def test_without_a_wait_calls_that_arrive_together_or_during_a_pass_share_a_batch(tiny_model_dir):
    """One encoder and one event loop for both cases: Ray keeps one `@serve.batch` queue per decorated method
    and process, bound to the event loop it first ran on."""
    encoder, passes, started, go_on = _encoder(tiny_model_dir)

    async def scenario():
        go_on.set()
        together = await asyncio.gather(*(encoder.embed_texts(_tokens(1)) for _ in range(5)))
        assert passes == [5]  # an idle encoder: the five calls queued in one loop turn form one pass
        assert [len(r) for r in together] == [1] * 5

        passes.clear()
        started.clear()
        go_on.clear()
        first = asyncio.ensure_future(encoder.embed_texts(_tokens(1)))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 30)
        later = [asyncio.ensure_future(encoder.embed_texts(_tokens(2))) for _ in range(4)]
        for _ in range(3000):  # all four held at the gate while the pass runs (a bound, not a timing)
            if encoder._gate._held_rows >= 8:
                break
            await asyncio.sleep(0.01)
        assert encoder._gate._held_rows == 8
        go_on.set()
        results = await asyncio.wait_for(asyncio.gather(first, *later), 60)
        assert passes == [1, 8]  # the idle encoder started at once; the four held calls went in as one batch
        assert [len(r) for r in results] == [1, 2, 2, 2, 2]

    asyncio.run(scenario())
