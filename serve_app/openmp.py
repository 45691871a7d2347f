"""One OpenMP team per serving process: the encoder's forward thread is the only thread that runs torch in
parallel.

libgomp (torch's OpenMP on Linux) gives every thread that starts a parallel region a team of worker threads
of its own, kept until that thread exits. Once a process holds more OpenMP threads than it has cores, libgomp
makes every team sleep at its barriers instead of spinning (its "throttled" spin count), and each forward pass
then waits on futex wake-ups instead of spinning through them (BENCHMARKS.md, "One OpenMP team per
process"). Loading the model on the forward thread (ClipEncoder) and keeping every other
thread that touches torch to one thread (this module) leaves one team.
"""

import threading

import torch
from threadpoolctl import threadpool_limits

_this_thread = threading.local()


def keep_torch_serial_on_this_thread() -> None:
    """torch ops on the calling thread run on it alone, without an OpenMP team; other threads keep torch's
    process-wide thread count. Idempotent and cheap after the first call on a thread."""
    if getattr(_this_thread, "serial", False):
        return
    # torch sets a thread's OpenMP thread count from its process-wide one the first time that thread asks
    # for it, which would undo the limit below if it came later: ask first.
    torch.get_num_threads()
    threadpool_limits(1, user_api="openmp")  # omp_set_num_threads(1): this thread's own setting only
    _this_thread.serial = True
