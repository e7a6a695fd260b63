"""The native hashing kernel (worker/sha512_lanes.c) and its loader and driver (worker/native.py).

Every kernel this machine runs, forced, against an independent hashlib reference; lanes that
finish at different times and a cancelled lane; the fallbacks to Python (library missing,
unloadable, wrong, of another interface version, or lacking the CPU's kernel); the build
script. Each test builds what it loads, so none depends on ./setup.sh having run.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import textwrap
import threading
import time
from array import array
from pathlib import Path

import pytest
from test_worker import python_3_9

from conftest import PYTHON, REPO, reference
from worker import native

BUILD_SCRIPT = REPO / "worker" / "build_kernel.sh"
NATIVE_KERNELS = ("avx512", "avx2", "scalar")
ITERATION_COUNTS = (1, 2, 3, 8191, 8192, 8193, 100_000)
# Empty, around the 128-byte block, and 1 MiB.
PAYLOAD_SIZES = (0, 1, 111, 112, 127, 128, 129, 5000, 1 << 20)

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (tests/run.sh installs gcc)")


def build(directory: Path, cflags: str = "") -> Path:
    env = {**os.environ, "DW_KERNEL_CFLAGS": cflags}
    subprocess.run([str(BUILD_SCRIPT), str(directory)], check=True, capture_output=True, env=env)
    return directory / "sha512_lanes.so"


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("cc") is None:
        pytest.skip("no C compiler (tests/run.sh installs gcc)")
    return build(tmp_path_factory.mktemp("kernel"))


def kernel_named(name: str, library: Path) -> native.Kernel:
    """The kernel forced by name; skipped with the reason if this machine cannot run it."""
    if name != "python":
        found = native.library_kernels(native.load_library(library)).get(name)
        if found is None or not found.supported:
            pytest.skip(f"this machine's CPU does not run the {name} kernel")
    kernel = native.select_kernel(name, library)
    assert kernel.name == name, kernel.reason
    return kernel


@pytest.fixture(params=[*NATIVE_KERNELS, "python"])
def kernel(request: pytest.FixtureRequest, library: Path) -> native.Kernel:
    return kernel_named(request.param, library)


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(size * 1000 + seed).randbytes(size)


def drive(lanes: native.Lanes, jobs: list[tuple[bytes, int]], max_steps: int = 5000,
          stop_on_finish: bool = True) -> dict[int, str]:
    """All jobs through the lanes, each lane refilled as soon as it is free: job index -> result."""
    waiting = list(range(len(jobs)))
    results: dict[int, str] = {}
    while waiting or lanes.busy():
        while waiting and lanes.free():
            index = waiting.pop(0)
            lanes.submit(index, *jobs[index])
        for index, result in lanes.step(max_steps, stop_on_finish=stop_on_finish and bool(waiting)):
            assert index not in results
            results[index] = result
    return results


def test_every_kernel_matches_hashlib_on_payloads_and_iteration_counts(kernel: native.Kernel) -> None:
    """Payloads of 0 bytes to 1 MiB, iterations 1 to 100,000, in lanes that finish at different times."""
    jobs = [(payload(size), iterations) for size in PAYLOAD_SIZES for iterations in ITERATION_COUNTS
            if iterations < 100_000 or size in (0, 1 << 20)]
    random.Random(1).shuffle(jobs)
    results = drive(native.Lanes(kernel, groups=2), jobs)
    wrong = [(len(data), iterations) for index, (data, iterations) in enumerate(jobs)
             if results[index] != reference(data, iterations)]
    assert not wrong, f"{kernel.name}: wrong results for (payload size, iterations) {wrong}"


def test_work_gives_the_reference_with_every_kernel(kernel: native.Kernel) -> None:
    """The single-job helper, the same answer as worker.hashing.work, across the chunk boundary."""
    for iterations in ITERATION_COUNTS:
        data = payload(iterations % 200)
        assert native.work(data, iterations, kernel=kernel) == reference(data, iterations), iterations


def test_work_stops_when_cancelled(kernel: native.Kernel) -> None:
    checks = []

    def cancelled() -> bool:
        checks.append(1)
        return len(checks) >= 3

    assert native.work(b"long", 10_000_000, cancelled, kernel=kernel) is None
    assert len(checks) == 3  # asked after each chunk of CHECK_EVERY steps, and stopped at once


def test_lanes_finish_at_different_times_and_come_back_at_once(kernel: native.Kernel) -> None:
    """A short job next to long ones is handed back after its own steps, not the longest lane's."""
    lanes: native.Lanes[str] = native.Lanes(kernel, groups=2)
    lengths = {f"job {index}": 3 + 4_000 * index for index in range(lanes.capacity)}
    for job, iterations in lengths.items():
        lanes.submit(job, job.encode(), iterations)
    assert lanes.free() == 0
    finished: list[tuple[int, str, str]] = []
    calls = 0
    while lanes.busy():
        calls += 1
        finished += [(calls, job, result) for job, result in lanes.step(1_000_000, stop_on_finish=True)]
    assert sorted(job for _, job, _ in finished) == sorted(lengths)
    assert all(result == reference(job.encode(), lengths[job]) for _, job, result in finished)
    # Lane i of a group ends in call i + 1: each call stopped when the group's next lane ended.
    assert {job: call for call, job, _ in finished} == {f"job {index}": index % kernel.lanes + 1
                                                       for index in range(lanes.capacity)}
    assert lanes.free() == lanes.capacity


def test_a_cancelled_lane_stops_while_the_others_go_on(kernel: native.Kernel) -> None:
    lanes: native.Lanes[str] = native.Lanes(kernel)
    jobs = {f"job {index}": 50_000 + index for index in range(lanes.capacity)}
    for job, iterations in jobs.items():
        lanes.submit(job, job.encode(), iterations)
    assert lanes.step(10_000) == []
    assert sorted(lanes.jobs()) == sorted(jobs)
    victim = "job 0"
    assert lanes.remaining(victim) == jobs[victim] - 1 - 10_000
    assert lanes.cancel(victim)
    assert not lanes.cancel(victim) and lanes.remaining(victim) is None
    assert lanes.free() == 1
    # The freed lane takes a new job at once; its old chain must not leak into it.
    lanes.submit("newcomer", b"newcomer", 20_000)
    results = dict(lanes.step(1_000_000))
    while lanes.busy():
        results.update(lanes.step(1_000_000))
    assert victim not in results
    del jobs[victim]
    assert results == {**{job: reference(job.encode(), n) for job, n in jobs.items()},
                       "newcomer": reference(b"newcomer", 20_000)}


def test_a_job_of_one_iteration_needs_no_lane_and_can_be_cancelled(kernel: native.Kernel) -> None:
    lanes: native.Lanes[str] = native.Lanes(kernel)
    lanes.submit("one", b"x", 1)
    lanes.submit("dropped", b"y", 1)
    assert lanes.free() == lanes.capacity and lanes.busy() == 2
    assert lanes.jobs() == ["one", "dropped"]
    assert lanes.cancel("dropped")
    assert lanes.step() == [("one", hashlib.sha512(b"x").hexdigest())]
    assert lanes.busy() == 0
    with pytest.raises(ValueError):
        lanes.submit("none", b"z", 0)


@pytest.mark.parametrize("name", NATIVE_KERNELS)
def test_the_library_call_advances_each_lane_by_at_most_max_steps(name: str, library: Path) -> None:
    """The C interface itself: in place, idle lanes untouched, refusals for bad arguments."""
    kernel = kernel_named(name, library)
    assert isinstance(kernel, native.NativeKernel)
    count = 2 * kernel.lanes
    starts = [hashlib.sha512(b"%d" % lane).digest() for lane in range(count)]
    steps = [lane * 3 % 7 for lane in range(count)]  # 0 (idle) to 6
    digests, remaining = bytearray(b"".join(starts)), array("Q", steps)
    busy = kernel.bind(digests, remaining)(4)
    assert list(remaining) == [max(0, n - 4) for n in steps]
    assert busy == sum(1 for n in steps if n > 4)
    for lane in range(count):
        done = min(4, steps[lane])
        expected = bytes.fromhex(reference(starts[lane], done)) if done else starts[lane]
        assert digests[lane * 64:(lane + 1) * 64] == expected
    iterate = kernel.library.dw_iterate
    assert iterate(kernel.index, bytes(64 * count), array("Q", [1] * count).tobytes(), count, 0, 0) == count
    if kernel.lanes > 1:
        assert iterate(kernel.index, bytes(64 * count), bytes(8 * count), count - 1, 1, 0) == -1
        with pytest.raises(ValueError):
            kernel.bind(bytearray(64 * (count - 1)), array("Q", [0] * (count - 1)))
    assert iterate(99, bytes(64), bytes(8), 1, 1, 0) == -1


def test_the_kernel_call_lets_other_threads_run(library: Path) -> None:
    """ctypes releases the GIL: the runner's lease threads keep working during a long call."""
    kernel = native.select_kernel("auto", library)
    digests, remaining = bytearray(64 * kernel.lanes), array("Q", [1_000_000] * kernel.lanes)
    advance = kernel.bind(digests, remaining)
    inside, ticks = threading.Event(), []
    call = threading.Thread(target=lambda: (inside.set(), advance(1_000_000)))
    call.start()
    inside.wait()
    while call.is_alive():
        ticks.append(time.perf_counter())
        time.sleep(0.001)
    call.join()
    assert len(ticks) > 20, "the main thread stalled during the call: the GIL was held"


def test_auto_picks_the_widest_kernel_for_lanes_and_scalar_for_one_job(library: Path) -> None:
    kernels = native.library_kernels(native.load_library(library))
    widest = next(name for name in native.LANES_PREFERENCE if kernels[name].supported)
    assert native.select_kernel("auto", library).name == widest
    assert native.select_kernel("auto", library, native.SINGLE_PREFERENCE).name == "scalar"


@needs_compiler
def test_a_build_for_other_architectures_has_the_scalar_kernel_alone(tmp_path: Path) -> None:
    portable = build(tmp_path, "-DDW_PORTABLE_ONLY")
    assert set(native.library_kernels(native.load_library(portable))) == {"scalar"}
    assert native.select_kernel("auto", portable).name == "scalar"
    forced = native.select_kernel("avx512", portable)
    assert forced.name == "python" and "avx512: not in" in forced.reason
    assert native.work(b"portable", 9000, kernel=native.select_kernel("auto", portable)) == reference(b"portable", 9000)


# ---- fallbacks: the worker still gives exact results, with the Python loop ----

FAKE_LIBRARY = textwrap.dedent("""
    #include <stddef.h>
    #include <stdint.h>
    /* The interface of sha512_lanes.c with believable bookkeeping and wrong digests. */
    static const char *names[] = {"scalar", "avx2", "avx512"};
    static const int lanes[] = {1, 4, 8};
    int dw_abi_version(void) { return ABI_VERSION; }
    int dw_kernel_count(void) { return 3; }
    const char *dw_kernel_name(int k) { return k >= 0 && k < 3 ? names[k] : NULL; }
    int dw_kernel_lanes(int k) { return k >= 0 && k < 3 ? lanes[k] : 0; }
    int dw_kernel_supported(int k) { return k != 1; }  /* a CPU without AVX2 */
    long long dw_iterate(int k, unsigned char *digests, uint64_t *remaining, size_t count, uint64_t max_steps,
                         int flags) {
        long long busy = 0;
        (void)k; (void)flags;
        for (size_t lane = 0; lane < count; lane++) {
            if (!remaining[lane]) continue;
            remaining[lane] -= remaining[lane] < max_steps ? remaining[lane] : max_steps;
            digests[lane * 64] ^= 1;
            busy += remaining[lane] != 0;
        }
        return busy;
    }
""")


def fake_library(directory: Path, abi_version: int = native.ABI_VERSION) -> Path:
    if shutil.which("cc") is None:
        pytest.skip("no C compiler to build the fake library (tests/run.sh installs gcc)")
    source, target = directory / "fake.c", directory / f"fake-{abi_version}.so"
    source.write_text(FAKE_LIBRARY)
    subprocess.run(["cc", "-shared", "-fPIC", f"-DABI_VERSION={abi_version}", "-o", str(target), str(source)],
                   check=True)
    return target


def assert_python_fallback(kernel: native.Kernel, why: str) -> None:
    assert kernel.name == "python" and not kernel.native
    assert why in kernel.reason
    for iterations in (1, 2, 8193):
        assert native.work(b"fallback", iterations, kernel=kernel) == reference(b"fallback", iterations)


def test_a_missing_library_falls_back_to_python(tmp_path: Path) -> None:
    assert_python_fallback(native.select_kernel("auto", tmp_path / "sha512_lanes.so"), "is missing")


def test_an_unloadable_library_falls_back_to_python(tmp_path: Path) -> None:
    garbage = tmp_path / "sha512_lanes.so"
    garbage.write_bytes(os.urandom(4096))
    assert_python_fallback(native.select_kernel("auto", garbage), "does not load")
    not_ours = Path(hashlib.__file__)  # a file that is not a shared library at all
    assert_python_fallback(native.select_kernel("scalar", not_ours), "does not load")


def test_a_library_that_gives_wrong_answers_is_refused(tmp_path: Path) -> None:
    library = fake_library(tmp_path)
    kernel = native.select_kernel("auto", library)
    assert_python_fallback(kernel, "avx512: wrong answer in the self-check, refused")
    assert "avx2: this CPU lacks it" in kernel.reason and "scalar: wrong answer" in kernel.reason


def test_a_library_of_another_interface_version_is_refused(tmp_path: Path) -> None:
    assert_python_fallback(native.select_kernel("auto", fake_library(tmp_path, abi_version=2)), "interface version 2")


def test_a_forced_kernel_the_cpu_lacks_falls_back_to_python(tmp_path: Path) -> None:
    assert_python_fallback(native.select_kernel("avx2", fake_library(tmp_path)), "avx2: this CPU lacks it")


def test_an_unknown_kernel_setting_is_an_error(library: Path) -> None:
    with pytest.raises(ValueError, match="unknown kernel 'avx-512'"):
        native.select_kernel("avx-512", library)


def run_work(env: dict[str, str], interpreter: str = PYTHON) -> subprocess.CompletedProcess[str]:
    """native.work in a process of its own, configured by the environment only, as a worker is."""
    script = ("import logging, sys; logging.basicConfig(level=logging.INFO, format='%(message)s');"
              "from worker import native; print(native.work(b'process', 20000)); print(native.default_kernel().name)")
    base = {name: value for name, value in os.environ.items() if name not in (native.KERNEL_ENV, native.LIBRARY_ENV)}
    return subprocess.run([interpreter, "-c", script], cwd=REPO, capture_output=True, text=True, check=True,
                          env={**base, **env}, timeout=60)


@pytest.mark.parametrize("setting", ["garbage", "missing", "python"])
def test_a_worker_process_falls_back_by_its_settings_and_says_why(setting: str, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.so"
    garbage.write_bytes(b"\x7fELF not really")
    env = {"garbage": {native.LIBRARY_ENV: str(garbage)},
           "missing": {native.LIBRARY_ENV: str(tmp_path / "absent.so")},
           "python": {native.KERNEL_ENV: "python"}}[setting]
    process = run_work(env)
    result, kernel = process.stdout.split()
    assert (result, kernel) == (reference(b"process", 20000), "python")
    assert "hashing kernel: python" in process.stderr
    assert {"garbage": "does not load", "missing": "is missing", "python": "forced"}[setting] in process.stderr


@pytest.mark.parametrize("name", NATIVE_KERNELS)
def test_a_worker_process_runs_the_kernel_its_setting_forces(name: str, library: Path) -> None:
    kernel_named(name, library)  # skips a kernel this CPU lacks
    process = run_work({native.LIBRARY_ENV: str(library), native.KERNEL_ENV: name})
    assert process.stdout.split() == [reference(b"process", 20000), name]
    assert f"hashing kernel: {name}" in process.stderr


def test_the_kernel_loads_under_python_3_9(library: Path) -> None:
    interpreter = python_3_9()
    if interpreter is None:
        pytest.skip("no Python 3.9 interpreter on this machine")
    process = run_work({native.LIBRARY_ENV: str(library)}, interpreter)
    expected_kernel = native.select_kernel("auto", library).name
    assert process.stdout.split() == [reference(b"process", 20000), expected_kernel]


# ---- the build script ----

@needs_compiler
def test_the_build_script_builds_into_a_directory_and_skips_an_up_to_date_library(tmp_path: Path) -> None:
    first = subprocess.run([str(BUILD_SCRIPT), str(tmp_path / "out")], capture_output=True, text=True, check=True)
    assert "built" in first.stdout
    assert native.select_kernel("auto", tmp_path / "out" / "sha512_lanes.so").native
    again = subprocess.run([str(BUILD_SCRIPT), str(tmp_path / "out")], capture_output=True, text=True, check=True)
    assert "up to date" in again.stdout
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["sha512_lanes.so"]


def test_the_build_script_says_so_without_a_compiler_and_leaves_nothing(tmp_path: Path) -> None:
    missing = subprocess.run([str(BUILD_SCRIPT), str(tmp_path / "none")], capture_output=True, text=True,
                             env={**os.environ, "CC": "no-such-compiler"})
    assert missing.returncode == 2 and "no C compiler" in missing.stderr
    failing = subprocess.run([str(BUILD_SCRIPT), str(tmp_path / "failed")], capture_output=True, text=True,
                             env={**os.environ, "CC": "false"})
    assert failing.returncode == 1 and "failed" in failing.stderr
    assert not (tmp_path / "none").exists() and list((tmp_path / "failed").iterdir()) == []
