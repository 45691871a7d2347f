"""PassGate: when waiting calls may form the next batch (serve_app/pass_gate.py). Plain asyncio, no Ray.

Every release below is forced by one condition alone (the others are set hours away), so no test passes by
timing luck; `asyncio.wait_for(..., 10)` only keeps a broken gate from hanging the suite.
"""

import asyncio

from serve_app.pass_gate import REFILL_OUTCOMES, PassGate

HOURS = 3600.0


class Outcomes(list):
    """The gate's refill reports (the encoder turns them into `clip_refill_wait_seconds`)."""

    def __call__(self, outcome: str, seconds: float) -> None:
        assert outcome in REFILL_OUTCOMES and seconds >= 0
        self.append(outcome)


async def _held(gate: PassGate, rows: int = 1) -> asyncio.Task:
    task = asyncio.ensure_future(gate.enter(rows))
    await asyncio.sleep(0)  # let it reach the gate
    return task


def test_an_idle_gate_lets_calls_through_and_a_running_pass_holds_them():
    async def scenario():
        gate = PassGate(refill_wait_fraction=0.5, refill_gap_s=HOURS)
        await asyncio.wait_for(gate.enter(4), 10)  # idle: straight through
        gate.pass_started()
        waiting = await _held(gate, 3)
        assert not waiting.done() and not gate.is_open
        # 3 rows arrived during a pass of 4: a steady stream, not clients waiting for answers -> open now
        gate.pass_ended(rows=4, seconds=HOURS, max_rows=32)
        await asyncio.wait_for(waiting, 10)
        assert gate.is_open

    asyncio.run(scenario())


def test_after_a_pass_the_gate_waits_for_the_callers_it_answered():
    outcomes = Outcomes()

    async def scenario():
        gate = PassGate(refill_wait_fraction=1.0, refill_gap_s=HOURS, on_refill=outcomes)
        gate.pass_started()
        straggler = await _held(gate)
        gate.pass_ended(rows=8, seconds=HOURS, max_rows=32)  # 8 answered, 1 waiting: expect 9 rows
        returning = [await _held(gate) for _ in range(7)]
        assert not straggler.done() and not gate.is_open  # 8 of 9: still shut
        returning.append(await _held(gate))
        await asyncio.wait_for(asyncio.gather(straggler, *returning), 10)
        assert gate.is_open

    asyncio.run(scenario())
    assert outcomes == ["all_back"]


def test_a_full_batch_waiting_opens_the_gate_at_once():
    outcomes = Outcomes()

    async def scenario():
        gate = PassGate(refill_wait_fraction=1.0, refill_gap_s=HOURS, on_refill=outcomes)
        gate.pass_started()
        first = await _held(gate)
        gate.pass_ended(rows=40, seconds=HOURS, max_rows=4)
        rest = [await _held(gate) for _ in range(3)]
        await asyncio.wait_for(asyncio.gather(first, *rest), 10)

    asyncio.run(scenario())
    assert outcomes == ["full"]


def test_a_pause_in_arrivals_ends_the_wait():
    outcomes = Outcomes()

    async def scenario():
        gate = PassGate(refill_wait_fraction=1.0, refill_gap_s=0.05, on_refill=outcomes)
        gate.pass_started()
        gate.pass_ended(rows=16, seconds=HOURS, max_rows=32)
        assert not gate.is_open  # nobody waiting yet, and no arrival yet: the pause has not begun
        only = await _held(gate)
        await asyncio.wait_for(only, 10)  # 1 of 16 came back, then nothing: released after the gap

    asyncio.run(scenario())
    assert outcomes == ["pause"]


def test_the_wait_is_bounded_by_a_fraction_of_the_pass():
    outcomes = Outcomes()

    async def scenario():
        gate = PassGate(refill_wait_fraction=0.5, refill_gap_s=HOURS, on_refill=outcomes)
        gate.pass_started()
        straggler = await _held(gate)
        gate.pass_ended(rows=16, seconds=0.1, max_rows=32)  # at most 50 ms; nobody else comes
        await asyncio.wait_for(straggler, 10)

    asyncio.run(scenario())
    assert outcomes == ["deadline"]


def test_refill_off_opens_when_the_pass_ends():
    async def scenario():
        gate = PassGate(refill_wait_fraction=0.0, refill_gap_s=HOURS)
        gate.pass_started()
        straggler = await _held(gate)
        gate.pass_ended(rows=16, seconds=HOURS, max_rows=32)
        assert gate.is_open
        await asyncio.wait_for(straggler, 10)

    asyncio.run(scenario())


def test_a_pass_started_by_calls_already_queued_takes_over_the_decision():
    async def scenario():
        gate = PassGate(refill_wait_fraction=1.0, refill_gap_s=HOURS)
        gate.pass_started()
        straggler = await _held(gate)
        gate.pass_ended(rows=8, seconds=HOURS, max_rows=32)  # refilling
        gate.pass_started()  # e.g. calls that were in the batch queue already
        gate.pass_ended(rows=1, seconds=HOURS, max_rows=32)  # 1 waiting, 1 answered: open
        await asyncio.wait_for(straggler, 10)

    asyncio.run(scenario())


def test_closed_loop_clients_stay_in_one_batch():
    """Eight clients that each send again 0-7 ms after their answer: every pass after the first has all eight.

    Without the refill wait the first returners would start the next pass alone and the clients would split
    into groups; here the gate releases by count only (gap and deadline hours away), so this is exact.
    """

    async def scenario():
        gate = PassGate(refill_wait_fraction=1.0, refill_gap_s=HOURS)
        queue: list[asyncio.Future] = []
        passes: list[int] = []

        async def encoder():
            while len(passes) < 6:
                await asyncio.sleep(0.002)  # the batch wait
                if not queue:
                    continue
                batch = queue[:]
                queue.clear()
                gate.pass_started()
                await asyncio.sleep(0.03)  # the forward pass
                passes.append(len(batch))
                gate.pass_ended(rows=len(batch), seconds=HOURS, max_rows=64)
                for answer in batch:
                    answer.set_result(None)

        async def client(index: int):
            while len(passes) < 6:
                await gate.enter(1)
                answer = asyncio.get_running_loop().create_future()
                queue.append(answer)
                await answer
                await asyncio.sleep(0.001 * index)  # the network and the client's own work

        clients = [asyncio.ensure_future(client(i)) for i in range(8)]
        await asyncio.wait_for(encoder(), 30)
        for c in clients:
            c.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        assert passes[1:] == [8] * 5, passes

    asyncio.run(scenario())
