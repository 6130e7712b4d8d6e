"""A child process whose output the tests read with a deadline (imported by test_reliability.py and
test_train.py): a child that hangs or stops printing fails its test instead of hanging the suite."""
import queue
import subprocess
import threading
import time


class Child:
    """`cmd` with stdout and stderr merged; a thread reads the lines, so that every wait has a timeout."""

    def __init__(self, cmd, **kw):
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
        self.lines, self._q = [], queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.p.stdout:
            self._q.put(line)
        self._q.put(None)  # the end of the output

    def tail(self, n=30):
        return ''.join(self.lines[-n:])

    def wait_for(self, prefix, timeout):
        """Read lines until one starts with `prefix` and return it; AssertionError if the output ends first,
        or if `timeout` seconds pass (the child is then killed)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise AssertionError(f"no line starting with {prefix!r} within {timeout} s:\n{self.tail()}") from None
            if line is None:
                self._q.put(None)
                raise AssertionError(f"the process ended before printing {prefix!r}:\n{self.tail()}")
            self.lines.append(line)
            if line.startswith(prefix):
                return line

    def finish(self, timeout):
        """Wait for the exit (killing the child after `timeout` s) -> (exit code, the output not read yet)."""
        try:
            self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running after {timeout} s:\n{self.tail()}") from None
        self._reader.join(timeout=60)
        rest = []
        while not self._q.empty():
            line = self._q.get()
            if line is not None:
                rest.append(line)
        self.lines += rest
        return self.p.returncode, ''.join(rest)

    def kill(self):
        self.p.kill()
        self.p.wait(timeout=60)
