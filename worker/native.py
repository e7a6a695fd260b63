"""Hashing kernels: the job's iterated SHA-512, for several jobs at once.

A job is sha512(data), then `iterations - 1` more times sha512 of the 64-byte digest before.
The first hash, of a payload of any size, stays with hashlib; the fixed-size steps after it
run in a kernel that advances several independent chains ("lanes") at once:

* native: sha512_lanes.c, built by build_kernel.sh into sha512_lanes.so next to this file
  (or the file named by DW_KERNEL_LIBRARY), loaded with ctypes, which releases the GIL for
  the call. Its kernels: avx512 (8 lanes), avx2 (4 lanes), scalar (1 lane, any CPU).
* python: the hashlib loop, one lane; it always works.

The kernel is chosen from the CPU's features, or forced with DW_KERNEL=avx512|avx2|scalar|
python (or an argument). A native kernel runs only after it matched hashlib on check vectors
at load; a missing, unloadable or wrong library falls back to the next kernel, and at last to
Python, and the log says which kernel runs and why.

    lanes = Lanes(default_kernel())            # kernel.lanes jobs in flight (per group)
    lanes.submit(job, payload, iterations)     # into a free lane
    for job, result in lanes.step(8192):       # every busy lane advances; finished jobs come back
        ...
    lanes.cancel(job)                          # a lost lease stops that lane only

Standard library only; Python 3.9.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
from array import array
from collections.abc import Callable, Sequence
from itertools import repeat
from pathlib import Path
from typing import Generic, TypeVar

log = logging.getLogger("worker")

KERNEL_ENV = "DW_KERNEL"
LIBRARY_ENV = "DW_KERNEL_LIBRARY"
LIBRARY_PATH = Path(__file__).resolve().parent / "sha512_lanes.so"
CHOICES = ("auto", "avx512", "avx2", "scalar", "python")
# Fastest first, for jobs that fill all lanes; for one job alone a scalar chain beats one lane
# of a vector (measured by bench/kernel_rate.py: 1.4-1.7 times one AVX-512 lane).
LANES_PREFERENCE = ("avx512", "avx2", "scalar")
SINGLE_PREFERENCE = ("scalar", "avx512", "avx2")
ABI_VERSION = 1  # DW_ABI_VERSION in sha512_lanes.c
STOP_ON_FINISH = 1  # DW_STOP_ON_FINISH
DIGEST_SIZE = 64
# Steps between looks at `cancelled` in work(): a few milliseconds with any kernel.
CHECK_EVERY = 8192

# advance(max_steps, stop_on_finish) -> lanes still busy: moves the bound buffers on.
Advance = Callable[[int, bool], int]


class KernelUnavailable(Exception):
    """The native library cannot be used; the message says why."""


class Kernel:
    """A way to advance lanes: `lanes` chains per group, over buffers bound once (bind)."""

    name = ""
    lanes = 1

    def __init__(self, reason: str = "") -> None:
        self.reason = reason  # why this kernel runs, for the log

    @property
    def native(self) -> bool:
        return self.name != "python"

    def bind(self, digests: bytearray, remaining: array) -> Advance:
        """An advance(max_steps, stop_on_finish) over these buffers: `digests` holds one
        64-byte digest per lane, `remaining[i]` the steps lane i still needs (0: idle). Each
        busy lane advances in place by up to max_steps steps; returns the lanes still busy."""
        count = len(remaining)
        if len(digests) != count * DIGEST_SIZE or remaining.itemsize != 8 or count % self.lanes:
            raise ValueError(f"buffers for {count} lanes do not fit the {self.name} kernel")
        return self._bind(digests, remaining)

    def _bind(self, digests: bytearray, remaining: array) -> Advance:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{self.name} kernel, {self.lanes} lane(s) per group: {self.reason}>"


class PythonKernel(Kernel):
    """The hashlib loop, lane after lane."""

    name = "python"

    def _bind(self, digests: bytearray, remaining: array) -> Advance:
        def advance(max_steps: int, stop_on_finish: bool = False) -> int:
            busy = 0
            for lane, left in enumerate(remaining):
                if not left:
                    continue
                steps = min(left, max_steps)
                start = lane * DIGEST_SIZE
                digests[start:start + DIGEST_SIZE] = python_steps(bytes(digests[start:start + DIGEST_SIZE]), steps)
                remaining[lane] = left - steps
                busy += left > steps
            return busy

        return advance


class NativeKernel(Kernel):
    """One kernel of the native library."""

    def __init__(self, library: ctypes.CDLL, index: int, name: str, lanes: int) -> None:
        super().__init__()
        self.library, self.index, self.name, self.lanes = library, index, name, lanes

    @property
    def supported(self) -> bool:
        return bool(self.library.dw_kernel_supported(self.index))

    def _bind(self, digests: bytearray, remaining: array) -> Advance:
        count = len(remaining)
        # Views that share the buffers' memory (and keep them alive while bound).
        digest_view = (ctypes.c_char * len(digests)).from_buffer(digests)
        remaining_view = (ctypes.c_uint64 * count).from_buffer(remaining)
        iterate, index = self.library.dw_iterate, self.index

        def advance(max_steps: int, stop_on_finish: bool = False) -> int:
            flags = STOP_ON_FINISH if stop_on_finish else 0
            busy = iterate(index, digest_view, remaining_view, count, max_steps, flags)
            if busy < 0:
                raise RuntimeError(f"the {self.name} kernel refused the call")
            return busy

        return advance


def load_library(path: Path) -> ctypes.CDLL:
    """The native library at `path`, its functions declared; KernelUnavailable says why not."""
    if not path.is_file():
        raise KernelUnavailable(f"{path} is missing (build it with worker/build_kernel.sh)")
    try:
        library = ctypes.CDLL(str(path))
        library.dw_abi_version.restype = ctypes.c_int
        library.dw_kernel_count.restype = ctypes.c_int
        library.dw_kernel_name.restype = ctypes.c_char_p
        library.dw_kernel_name.argtypes = [ctypes.c_int]
        library.dw_kernel_lanes.restype = ctypes.c_int
        library.dw_kernel_lanes.argtypes = [ctypes.c_int]
        library.dw_kernel_supported.restype = ctypes.c_int
        library.dw_kernel_supported.argtypes = [ctypes.c_int]
        library.dw_iterate.restype = ctypes.c_longlong
        library.dw_iterate.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                       ctypes.c_uint64, ctypes.c_int]
    except (OSError, AttributeError) as exc:  # not a library for this machine / not ours
        raise KernelUnavailable(f"{path} does not load: {exc}") from exc
    version = library.dw_abi_version()
    if version != ABI_VERSION:
        raise KernelUnavailable(f"{path} has interface version {version}, this worker needs {ABI_VERSION} "
                                "(rebuild it with worker/build_kernel.sh)")
    return library


def library_kernels(library: ctypes.CDLL) -> dict[str, NativeKernel]:
    kernels = {}
    for index in range(library.dw_kernel_count()):
        name, lanes = library.dw_kernel_name(index), library.dw_kernel_lanes(index)
        if name and 1 <= lanes <= 64:
            kernels[name.decode()] = NativeKernel(library, index, name.decode(), lanes)
    return kernels


def python_steps(digest: bytes, steps: int) -> bytes:
    """The reference: `steps` more times sha512 of the digest."""
    sha512 = hashlib.sha512
    for _ in repeat(None, steps):
        digest = sha512(digest).digest()
    return digest


def self_check(kernel: Kernel) -> str | None:
    """None if the kernel gives hashlib's answers, else what went wrong.

    At least two groups of lanes of different lengths (one idle, two ending at the same step,
    most crossing calls), advanced in short calls that stop when a lane finishes, as a driver
    that refills lanes calls it; about a millisecond of work.
    """
    count = max(2, 8 // kernel.lanes) * kernel.lanes
    steps = ([1, 0, 75, 22, 22, 6, 43, 80] + [1 + (lane * 37) % 90 for lane in range(8, count)])[:count]
    starts = [hashlib.sha512(b"dw self-check %d" % lane).digest() for lane in range(count)]
    expected = [python_steps(starts[lane], steps[lane]) for lane in range(count)]
    digests, remaining = bytearray(b"".join(starts)), array("Q", steps)
    advance = kernel.bind(digests, remaining)
    for _ in range(2 * count + 10):  # each call ends a lane or runs 25 steps
        busy = advance(25, True)
        if busy != sum(1 for left in remaining if left):
            return f"it reported {busy} busy lanes, not {sum(1 for left in remaining if left)}"
        if busy == 0:
            break
    else:
        return "its lanes never finished"
    wrong = [lane for lane in range(count) if digests[lane * DIGEST_SIZE:(lane + 1) * DIGEST_SIZE] != expected[lane]]
    return f"lanes {wrong} differ from hashlib" if wrong else None


def select_kernel(choice: str | None = None, library_path: str | Path | None = None,
                  preference: Sequence[str] = LANES_PREFERENCE) -> Kernel:
    """The kernel to run: `choice` (else DW_KERNEL, else auto: the first of `preference` that
    this CPU runs and that passes the self-check), from `library_path` (else
    DW_KERNEL_LIBRARY, else sha512_lanes.so next to this file). Falls back to Python. Logs
    which kernel runs and why."""
    choice = (choice or os.environ.get(KERNEL_ENV) or "auto").strip().lower()
    if choice not in CHOICES:
        raise ValueError(f"unknown kernel {choice!r} (from {KERNEL_ENV}?): choose one of {', '.join(CHOICES)}")
    if choice == "python":
        return _chosen(PythonKernel("forced"), [])
    path = Path(library_path or os.environ.get(LIBRARY_ENV) or LIBRARY_PATH)
    try:
        available = library_kernels(load_library(path))
    except KernelUnavailable as exc:
        return _chosen(PythonKernel("fallback"), [str(exc)])
    problems = []
    for name in preference if choice == "auto" else (choice,):
        kernel = available.get(name)
        if kernel is None:
            problems.append(f"{name}: not in {path}")
        elif not kernel.supported:
            problems.append(f"{name}: this CPU lacks it")
        else:
            problem = self_check(kernel)
            if problem is None:
                kernel.reason = "forced" if choice != "auto" else "chosen for this CPU"
                return _chosen(kernel, problems)
            problems.append(f"{name}: wrong answer in the self-check, refused: {problem}")
    return _chosen(PythonKernel("fallback"), problems)


def _chosen(kernel: Kernel, problems: list[str]) -> Kernel:
    if problems:
        kernel.reason += f" ({'; '.join(problems)})"
        log.warning("hashing kernel: %s, %d lane(s) per group: %s", kernel.name, kernel.lanes, kernel.reason)
    else:
        log.info("hashing kernel: %s, %d lane(s) per group: %s", kernel.name, kernel.lanes, kernel.reason)
    return kernel


@functools.cache
def default_kernel() -> Kernel:
    """This process's kernel for jobs that fill lanes, chosen (and logged) once."""
    return select_kernel()


@functools.cache
def single_job_kernel() -> Kernel:
    """This process's kernel for one job at a time, chosen (and logged) once."""
    return select_kernel(preference=SINGLE_PREFERENCE)


T = TypeVar("T")


class Lanes(Generic[T]):
    """Jobs in flight on one kernel, one per lane; a finished lane takes the next job at once.

    Not thread-safe: submit, cancel and step from one thread. Threads that watch leases
    should tell that thread, which cancels between steps.
    """

    def __init__(self, kernel: Kernel, groups: int = 1, single: Kernel | None = None) -> None:
        """`single`: a kernel for the moments when one lane alone is busy (a scalar chain is faster
        than one lane of a vector), run on the same buffers."""
        if groups < 1:
            raise ValueError("groups must be at least 1")
        self.kernel = kernel
        self.capacity = kernel.lanes * groups
        self._digests = bytearray(DIGEST_SIZE * self.capacity)
        self._remaining = array("Q", bytes(8 * self.capacity))
        self._advance = kernel.bind(self._digests, self._remaining)
        self._advance_single = single.bind(self._digests, self._remaining) if single is not None else None
        self._jobs: list[T | None] = [None] * self.capacity
        self._occupied = [False] * self.capacity
        self._free = list(range(self.capacity - 1, -1, -1))
        self._done: list[tuple[T, str]] = []  # finished without a lane (iterations == 1)

    def free(self) -> int:
        """Lanes that can take a job now."""
        return len(self._free)

    def busy(self) -> int:
        """Jobs not yet handed back by step(), in lanes or finished already."""
        return self.capacity - len(self._free) + len(self._done)

    def jobs(self) -> list[T]:
        """The jobs not yet handed back (whose leases to keep)."""
        return [job for lane, job in enumerate(self._jobs) if self._occupied[lane]] + [job for job, _ in self._done]

    def submit(self, job: T, data: bytes, iterations: int) -> None:
        """Start `job` in a free lane (ValueError if there is none): its first hash now."""
        if iterations < 1:
            raise ValueError("iterations must be at least 1")
        if not self._free:
            raise ValueError("no free lane")
        digest = hashlib.sha512(data).digest()
        if iterations == 1:
            self._done.append((job, digest.hex()))
            return
        lane = self._free.pop()
        self._digests[lane * DIGEST_SIZE:(lane + 1) * DIGEST_SIZE] = digest
        self._remaining[lane] = iterations - 1
        self._jobs[lane] = job
        self._occupied[lane] = True

    def remaining(self, job: T) -> int | None:
        """Steps `job` still needs; None if it is not in a lane."""
        lane = self._lane_of(job)
        return None if lane is None else self._remaining[lane]

    def cancel(self, job: T) -> bool:
        """Drop `job` (one equal to a job submitted), whatever its progress; its lane is free at
        once. False if it was not here (finished and handed back, or never submitted)."""
        lane = self._lane_of(job)
        if lane is not None:
            self._release(lane)
            return True
        for index, (done_job, _) in enumerate(self._done):
            if done_job == job:
                del self._done[index]
                return True
        return False

    def step(self, max_steps: int = CHECK_EVERY, stop_on_finish: bool = False) -> list[tuple[T, str]]:
        """Advance every busy lane by up to `max_steps` steps; returns the jobs that finished,
        with their results (hex). With `stop_on_finish` a group stops early, right after one of
        its lanes finished, so that its lane can be refilled: use it while jobs are waiting."""
        finished, self._done = self._done, []
        busy = self.capacity - len(self._free)
        if busy and max_steps > 0:
            alone = busy == 1 and self._advance_single is not None
            (self._advance_single if alone else self._advance)(max_steps, stop_on_finish)
            for lane, job in enumerate(self._jobs):
                if self._occupied[lane] and self._remaining[lane] == 0:
                    finished.append((job, self._digests[lane * DIGEST_SIZE:(lane + 1) * DIGEST_SIZE].hex()))
                    self._release(lane)
        return finished

    def _lane_of(self, job: T) -> int | None:
        for lane, lane_job in enumerate(self._jobs):
            if self._occupied[lane] and lane_job == job:
                return lane
        return None

    def _release(self, lane: int) -> None:
        self._remaining[lane] = 0
        self._jobs[lane] = None
        self._occupied[lane] = False
        self._free.append(lane)


def work(data: bytes, iterations: int, cancelled: Callable[[], bool] | None = None,
         kernel: Kernel | None = None) -> str | None:
    """sha512(data), then `iterations - 1` more times sha512 of the previous digest, as hex;
    None if `cancelled()` turned true first (it is asked every CHECK_EVERY steps). The same
    answer as worker.hashing.work, by `kernel` (default: the best for one job)."""
    lanes: Lanes[None] = Lanes(kernel or single_job_kernel())
    lanes.submit(None, data, iterations)
    while True:
        finished = lanes.step(CHECK_EVERY)
        if finished:
            return finished[0][1]
        if cancelled is not None and cancelled():
            return None
