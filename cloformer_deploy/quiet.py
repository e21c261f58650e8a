"""Keep a terminal or notebook to this project's own progress while converters and runtimes work.

Converters and runtimes report through four channels: Python warnings, ``logging`` (coremltools'
untested-torch notice, torchao's optional kernels, torch.onnx's registrations), tqdm progress
bars (coremltools' passes) and C++ writes to file descriptor 2 (ExecuTorch's cpuinfo lines on
every program load). :func:`quiet_libraries` silences the first three for its duration and
filters the fourth line by line, so that a real error from native code still shows.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import tempfile
import threading
import warnings
from contextlib import contextmanager

# lines native code prints that say nothing to a user (cpuinfo's probing of sysfs on x86)
NATIVE_NOISE = re.compile(r"^\[cpuinfo_utils\.cpp:\d+\]")
# ExecuTorch's threadpool says so on every reset
THREADPOOL_NOISE = re.compile(r"^\[threadpool\.cpp:\d+\] Resetting threadpool to \d+ threads\.?\s*$")


# LiteRT and its converter: absl's informational lines (I<mmdd> <time> <thread> <file>:<line>] ...), its notice
# that logging starts before absl is set up, and the interpreter's line on creating its default delegate
LITERT_NOISE = re.compile(
    r"^(I\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] "
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|INFO: Created TensorFlow Lite XNNPACK delegate for CPU\.)"
)


# Ray's core, on every ray.init: that it could not reach the internet to learn its address (a cluster on loopback
# needs none), and that it read its log level
RAY_NOISE = re.compile(
    r"^\[\d{4}-\d\d-\d\d [\d:,]+ [IW] \d+ \d+\] "
    r"(network_util\.cc:\d+: Failed to determine local IP|logging\.cc:\d+: Set ray log level)"
)


def is_native_noise(line: str) -> bool:
    """A line the runtimes' native code prints on every run that says nothing to the user."""
    return bool(
        NATIVE_NOISE.match(line) or THREADPOOL_NOISE.match(line) or LITERT_NOISE.match(line) or RAY_NOISE.match(line)
    )


_depth = 0  # nested calls (export inside bench) install the filters once
_lock = threading.Lock()
_active: _NativeStderrFilter | None = None  # the filter in place, if any


@contextmanager
def quiet_libraries():
    global _depth
    with _lock:
        _depth += 1
        outermost = _depth == 1
    if not outermost:
        try:
            yield
        finally:
            with _lock:
                _depth -= 1
        return
    previous_disable = logging.root.manager.disable
    restore_tqdm = _disable_tqdm()
    global _active
    native = _active = _NativeStderrFilter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.disable(logging.WARNING)
            native.start()
            yield
    finally:
        native.stop()
        _active = None
        logging.disable(previous_disable)
        restore_tqdm()
        with _lock:
            _depth -= 1


def _disable_tqdm():
    """tqdm bars off while quiet (coremltools draws one per conversion pass, ai-edge-quantizer one per stage)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return lambda: None
    original = tqdm.__init__

    def init(self, *args, **kwargs):
        kwargs["disable"] = True  # also over a library that passes its own (ai-edge-quantizer)
        original(self, *args, **kwargs)

    tqdm.__init__ = init

    def restore():
        tqdm.__init__ = original

    return restore


class _NativeStderrFilter:
    """Route file descriptor 2 through a pipe; a thread passes on every line but the known noise.

    Python's own ``sys.stderr`` writes go through the same descriptor, so our progress lines
    pass through the filter unchanged and in order.
    """

    def __init__(self):
        self.saved = None
        self.thread = None

    def start(self) -> None:
        try:
            fd = sys.__stderr__.fileno()
        except (AttributeError, ValueError, OSError):  # no real stderr (embedded interpreter)
            return
        sys.__stderr__.flush()
        self.saved = os.dup(fd)
        read_end, write_end = os.pipe()
        os.dup2(write_end, fd)
        os.close(write_end)
        self.thread = threading.Thread(target=self._pump, args=(read_end, self.saved), daemon=True)
        self.thread.start()

    @staticmethod
    def _pump(read_end: int, out: int) -> None:
        buffer, dropped = b"", False
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            while True:
                chunk = pipe.read(65536)
                if not chunk:
                    break
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    # a blank line right after a noise line ends that message (absl's diagnostics)
                    noise = is_native_noise(line.decode(errors="replace")) or (dropped and not line.strip())
                    if not noise:
                        os.write(out, line + b"\n")
                    dropped = noise
        if buffer and not is_native_noise(buffer.decode(errors="replace")):
            os.write(out, buffer)

    def stop(self) -> None:
        if self.saved is None:
            return
        fd = sys.__stderr__.fileno()
        sys.__stderr__.flush()
        os.dup2(self.saved, fd)  # closes the pipe's last write end: the pump sees EOF
        self.thread.join(timeout=5)
        os.close(self.saved)
        self.saved = None


@contextmanager
def stderr_unfiltered():
    """File descriptor 2 as it was before :func:`quiet_libraries`, for the duration: to start a helper process that
    outlives the filter (multiprocessing's resource tracker), which would otherwise hold the filter's pipe open."""
    saved = _active.saved if _active is not None else None
    if saved is None:
        yield
        return
    fd = sys.__stderr__.fileno()
    sys.__stderr__.flush()
    piped = os.dup(fd)
    os.dup2(saved, fd)
    try:
        yield
    finally:
        os.dup2(piped, fd)
        os.close(piped)


@contextmanager
def native_noise_held():
    """Hold ExecuTorch's log lines while its native code runs; then pass on all but its noise.

    ExecuTorch logs every threadpool reset (and cpuinfo's probing, once) through std::cerr, which
    its Python bindings send to ``sys.stderr`` during a call and which is file descriptor 2 outside
    one: both are held. A real error still shows, after the call that logged it.
    """
    held_text, previous = io.StringIO(), sys.stderr
    try:
        fd = sys.__stderr__.fileno()
    except (AttributeError, ValueError, OSError):  # no real stderr (embedded interpreter)
        fd = None
    with tempfile.TemporaryFile() as held_fd:  # unlinked at once: nothing stays on disk
        if fd is not None:
            sys.__stderr__.flush()
            saved = os.dup(fd)
            os.dup2(held_fd.fileno(), fd)
        sys.stderr = held_text
        try:
            yield
        finally:
            sys.stderr = previous
            if fd is not None:
                sys.__stderr__.flush()
                os.dup2(saved, fd)
                os.close(saved)
                held_fd.seek(0)
                for line in held_fd.read().decode(errors="replace").splitlines(keepends=True):
                    if not is_native_noise(line):
                        os.write(fd, line.encode())
            kept = [line for line in held_text.getvalue().splitlines(keepends=True) if not is_native_noise(line)]
            if kept:
                previous.write("".join(kept))
                previous.flush()
