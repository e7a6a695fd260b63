"""Hashes per second on one core: the bare Python loop against each hashing kernel, in one run.

1. Bare loop: `out = sha512(out).digest()`, as bench/hash_rate.py times it.
2. Each kernel this CPU runs (worker/native.py, from the library that ./setup.sh built, or
   DW_KERNEL_LIBRARY), all lanes busy: one group of lanes, driven by native.Lanes in steps of
   CHECK_EVERY (8192), as the worker will drive it, so the driver's cost is counted too.
3. The phases alternate (python, kernels..., python, kernels..., python) and each kernel phase
   is compared with the mean of the two bare phases around it, so a shared machine's drift
   cancels out. Rates are per CPU second of this thread (time.thread_time), so time the
   process waits for the CPU does not count.
4. One job alone (native.work): why a single job runs on the scalar kernel.

    usage: .venv/bin/python -m bench.kernel_rate [SECONDS [ROUNDS [GHZ]]]
GHZ, the core's clock if you know it, adds the AVX-512 kernel's cycles per step of its 8
lanes (its bound: about 1,990 vector instructions per step, at 2 per cycle).
"""

from __future__ import annotations

import hashlib
import statistics
import sys
import time
from itertools import repeat

from worker import native

# What the worker's end-to-end figures must reach (issue 8); the kernel alone should beat them.
END_TO_END_TARGETS = {"avx512": 12.0, "avx2": 4.5, "scalar": 2.4}


def bare_loop_rate(seconds: float) -> float:
    sha512 = hashlib.sha512
    out = sha512(b"bench").digest()
    done = 0
    started = time.thread_time()
    while time.thread_time() - started < seconds:
        for _ in repeat(None, 100_000):
            out = sha512(out).digest()
        done += 100_000
    return done / (time.thread_time() - started)


def kernel_rate(kernel: native.Kernel, seconds: float) -> float:
    """All lanes of one group busy: jobs too long to finish in the phase."""
    lanes: native.Lanes[int] = native.Lanes(kernel)
    for job in range(lanes.capacity):
        lanes.submit(job, b"bench %d" % job, 1 << 40)
    done = 0
    started = time.thread_time()
    while time.thread_time() - started < seconds:
        lanes.step(native.CHECK_EVERY)
        done += native.CHECK_EVERY * lanes.capacity
    return done / (time.thread_time() - started)


def single_job_rate(kernel: native.Kernel, seconds: float) -> float:
    iterations = 200_000
    jobs = 0
    started = time.thread_time()
    while time.thread_time() - started < seconds:
        native.work(b"one job %d" % jobs, iterations, kernel=kernel)
        jobs += 1
    return jobs * iterations / (time.thread_time() - started)


def runnable_kernels() -> list[native.Kernel]:
    kernels = []
    for name in ("scalar", "avx2", "avx512"):
        kernel = native.select_kernel(name)
        if kernel.native:
            kernels.append(kernel)
        else:
            print(f"  {name}: not measured: {kernel.reason}")
    return kernels


def main(seconds: float = 3.0, rounds: int = 3, ghz: float = 0.0) -> None:
    kernels = runnable_kernels()
    print(f"one core, {seconds:g}s per phase, {rounds} rounds of: bare loop, {', '.join(k.name for k in kernels)}")
    bare = [bare_loop_rate(seconds)]
    print(f"  bare loop            {bare[-1] / 1e6:6.2f} M hashes/s")
    rates: dict[str, list[float]] = {kernel.name: [] for kernel in kernels}
    ratios: dict[str, list[float]] = {kernel.name: [] for kernel in kernels}
    for _ in range(rounds):
        for kernel in kernels:
            rates[kernel.name].append(kernel_rate(kernel, seconds))
            print(f"  {kernel.name:7s} {kernel.lanes} lane(s)   {rates[kernel.name][-1] / 1e6:6.2f} M hashes/s")
        bare.append(bare_loop_rate(seconds))
        print(f"  bare loop            {bare[-1] / 1e6:6.2f} M hashes/s")
        for kernel in kernels:
            ratios[kernel.name].append(rates[kernel.name][-1] / ((bare[-2] + bare[-1]) / 2))
    print("kernel / neighbouring bare loops (all lanes busy):")
    for name, values in ratios.items():
        target = END_TO_END_TARGETS.get(name)
        print(f"  {name:7s} {', '.join(f'{r:.2f}' for r in values)}; median {statistics.median(values):.2f}x"
              + (f" (the worker's end-to-end target: {target}x)" if target else ""))
    if ghz and "avx512" in rates:
        cycles = ghz * 1e9 / (max(rates["avx512"]) / 8)
        print(f"  avx512 at {ghz:g} GHz: {cycles:.0f} cycles per step of 8 lanes at best; "
              f"{995 / cycles:.0%} of the ~995-cycle bound")
    print("one job alone (native.work, 200,000 iterations), M hashes/s:")
    python_alone = single_job_rate(native.select_kernel("python"), seconds / 2)
    print(f"  python  {python_alone / 1e6:6.2f}")
    for kernel in kernels:
        alone = single_job_rate(kernel, seconds / 2)
        print(f"  {kernel.name:7s} {alone / 1e6:6.2f}  ({alone / python_alone:.2f}x)")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(float(args[0]) if args else 3.0, int(args[1]) if len(args) > 1 else 3,
         float(args[2]) if len(args) > 2 else 0.0)
