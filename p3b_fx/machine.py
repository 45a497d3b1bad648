"""What machine a measurement ran on, for the benchmark docs; how much memory this process holds."""

from __future__ import annotations

import _thread
import os
import platform
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else whatever platform knows."""
    fallback = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # no /proc (not Linux)
        return fallback
    names = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
    return names[0] if names else fallback


def describe(gpu: bool = True) -> str:
    """CPU model, cores, the CUDA GPU if one is visible (``gpu``), OS and torch version, one line."""
    import torch  # noqa: PLC0415 - keeps cpu_name importable without torch

    parts = [cpu_name(), f"{os.cpu_count()} cores"]
    if gpu:
        parts.append(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA GPU")
    return ", ".join([*parts, f"{platform.system()} {platform.release()}", f"torch {torch.__version__}"])


def resident_bytes() -> int | None:
    """This process's resident memory now (Linux ``/proc/self/statm``), None where unknown."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def available_bytes() -> int | None:
    """Memory the kernel can still hand out (``MemAvailable`` in /proc/meminfo), None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        return None
    return None


class MemoryLimitExceeded(MemoryError):
    """Raised by :func:`memory_limit` in the thread that entered it."""


@contextmanager
def memory_limit(limit: int | None, interval: float = 0.2) -> Iterator[None]:
    """Stop the enclosed code once this process holds more than ``limit`` bytes (checked every
    ``interval`` s by a watcher thread, which interrupts the main thread): a
    :class:`MemoryLimitExceeded` instead of the kernel killing the process without a word.
    Python code stops at its next bytecode; a single long native call finishes first. No limit
    (None), no way to read the memory (not Linux), or a caller off the main thread (the interrupt
    could reach only the main thread): the code just runs."""
    if limit is None or resident_bytes() is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    stop, peak = threading.Event(), [0]

    def watch() -> None:
        while not stop.wait(interval):
            peak[0] = max(peak[0], resident_bytes() or 0)
            if peak[0] > limit:
                _thread.interrupt_main()
                return

    # interrupt_main() raises KeyboardInterrupt through Python's own SIGINT handler, and does nothing
    # where SIGINT is ignored or handled elsewhere (a launcher's handler, a test runner's): put the
    # default handler in place while the code runs (this is the main thread, so it may)
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    watcher = threading.Thread(target=watch, name="memory-limit", daemon=True)
    watcher.start()
    try:
        yield
    except KeyboardInterrupt:
        if peak[0] > limit:
            raise MemoryLimitExceeded(
                f"{peak[0] / 2**30:.1f} GiB held, limit {limit / 2**30:.1f} GiB"
            ) from None
        raise
    finally:
        stop.set()
        watcher.join()
        if peak[0] > limit:  # the code finished as the watcher fired: take its interrupt here, not later
            try:
                for _ in range(10_000):  # the interpreter handles a pending interrupt on a back edge
                    pass
            except KeyboardInterrupt:
                pass
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
