"""The timer: interleaved rounds over many things to time, warm-up first, the median and the spread.

Each thing timed is a ``Timed``: a zero-argument callable and the clock that times it on its device.
``interleave`` runs rounds; in each round every ``Timed`` takes one sample, in an order that rotates from
round to round, so that the machine's drift (clock boost, a neighbour's load) hits all of them alike.
A sample is ``number`` timed calls, ``number`` chosen at warm-up so that one sample lasts at least
``min_sample_s``, after one untimed call that lets the previous thing's thread pools and caches settle.

Clocks: on the host, ``time.perf_counter`` around the calls, then the device's synchronize. On a CUDA
device, events recorded on the stream around the calls and synchronized (``cupy.cuda.Event``,
``torch.cuda.Event``), so that a GPU step is timed on the GPU, not by the host's launch queue.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field


SETTLE_BELOW_S = 0.1  # calls shorter than this get an untimed call before each sample


class HostClock:
    """Wall time of ``number`` calls, then ``synchronize()`` (a CPU device, or a GPU without events)."""

    def __init__(self, synchronize=None):
        self.synchronize = synchronize or (lambda: None)

    def __call__(self, fn, number: int) -> float:
        """Seconds for ``number`` calls of ``fn``."""
        start = time.perf_counter()
        for _ in range(number):
            fn()
        self.synchronize()
        return time.perf_counter() - start


class CudaEventClock:
    """Time between two CUDA events around ``number`` calls, on the current stream.

    ``event``: a zero-argument factory of timing-enabled events (``cupy.cuda.Event`` or
    ``lambda: torch.cuda.Event(enable_timing=True)``); ``elapsed_ms(start, end)`` reads the time between two.
    """

    def __init__(self, event, elapsed_ms):
        self.event, self.elapsed_ms = event, elapsed_ms

    def __call__(self, fn, number: int) -> float:
        start, end = self.event(), self.event()
        start.record()
        for _ in range(number):
            fn()
        end.record()
        end.synchronize()
        return self.elapsed_ms(start, end) / 1e3


def cupy_clock() -> CudaEventClock:
    import cupy

    return CudaEventClock(cupy.cuda.Event, cupy.cuda.get_elapsed_time)


def torch_cuda_clock() -> CudaEventClock:
    import torch

    return CudaEventClock(lambda: torch.cuda.Event(enable_timing=True), lambda start, end: start.elapsed_time(end))


@dataclass
class Timed:
    """A thing to time: ``fn()`` runs it once; ``clock(fn, number)`` returns the seconds of ``number`` runs."""

    fn: object
    clock: object = field(default_factory=HostClock)


@dataclass
class Timing:
    """The samples of one ``Timed``: seconds per call, one sample per round, each the mean of ``number`` calls."""

    samples: list[float]
    number: int

    def quantile(self, q: float) -> float:
        """The q-quantile of the samples (linear interpolation), in seconds."""
        ordered = sorted(self.samples)
        pos = q * (len(ordered) - 1)
        low = int(pos)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def summary_ms(self) -> dict:
        """median, quartiles, min and max in milliseconds per call, the rounds, the calls per sample, the samples."""
        return {
            "median_ms": self.median * 1e3,
            "q1_ms": self.quantile(0.25) * 1e3,
            "q3_ms": self.quantile(0.75) * 1e3,
            "min_ms": min(self.samples) * 1e3,
            "max_ms": max(self.samples) * 1e3,
            "rounds": len(self.samples),
            "number": self.number,
            "samples_ms": [s * 1e3 for s in self.samples],
        }


def calibrate(timed: Timed, min_sample_s: float, warmup_s: float, max_number: int = 1 << 16) -> tuple[int, float]:
    """Warms ``timed`` up for about ``warmup_s`` (two calls at least); returns (number, seconds per call):
    how many calls make one sample of at least ``min_sample_s``, and the fastest warm-up call."""
    deadline, calls = time.perf_counter() + warmup_s, 0
    per_call = float("inf")
    while calls < 2 or time.perf_counter() < deadline:
        per_call = min(per_call, timed.clock(timed.fn, 1))
        calls += 1
    number = 1
    while number < max_number and number * per_call < min_sample_s:
        number *= 2
    return number, per_call


def interleave(timeds: dict, rounds: int, min_rounds: int = 3, max_time_s: float = float("inf"),
               min_sample_s: float = 0.01, warmup_s: float = 0.05, on_round=None) -> dict:
    """Times every ``Timed`` of ``timeds`` (key -> Timed) in interleaved rounds; returns key -> Timing.

    Stops after ``rounds`` rounds, or earlier once ``max_time_s`` has passed and ``min_rounds`` are done.
    A sample starts with one untimed call when a call is shorter than ``SETTLE_BELOW_S`` (longer calls
    dwarf what the previous thing leaves behind). ``on_round(done)`` is called after each round.
    """
    calibrated = {key: calibrate(t, min_sample_s, warmup_s) for key, t in timeds.items()}
    samples = {key: [] for key in timeds}
    keys = list(timeds)
    start = time.perf_counter()
    for done in range(1, rounds + 1):
        shift = (done - 1) % len(keys)
        for key in keys[shift:] + keys[:shift]:
            timed, (number, per_call) = timeds[key], calibrated[key]
            if per_call < SETTLE_BELOW_S:
                timed.clock(timed.fn, 1)  # settle, untimed: the previous thing's thread pools and caches
            samples[key].append(timed.clock(timed.fn, number) / number)
        if on_round is not None:
            on_round(done)
        if done >= min_rounds and time.perf_counter() - start > max_time_s:
            break
    return {key: Timing(samples[key], calibrated[key][0]) for key in keys}


def time_first_call(fn, clock=None) -> float:
    """Seconds of one call of ``fn`` (a first call: allocation, tracing, compilation), synchronized."""
    return (clock or HostClock())(fn, 1)
