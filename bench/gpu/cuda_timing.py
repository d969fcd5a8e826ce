"""Shared by the PyTorch / diffusers peers of bench/gpu (the Python side of device_timing.h): the
median time of `reps` calls of fn() after 5 warm-ups, each timed with CUDA events."""
import torch


def time_ms(fn, reps):
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]
