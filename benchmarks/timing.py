"""Shared by the benchmarks (run as scripts, so this folder is on sys.path)."""
import time


class Clock:
    """Wall and process (CPU) seconds of a block."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
