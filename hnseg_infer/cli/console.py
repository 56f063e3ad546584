"""What the container prints, and only that: one line per message, whatever the file names, the terminal's
encoding or the state of stdout; third-party chatter (onnxruntime, ITK, Python warnings) kept off stderr.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from contextlib import contextmanager


def printable(text: str) -> str:
    """`text` on one line: control characters (newlines, ANSI escapes, a tab in a file name) shown escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def say(text: str, stream=None) -> None:
    """Print one line; a closed pipe or an encoding the terminal lacks never turns a run into a traceback."""
    stream = stream if stream is not None else sys.stdout
    line = printable(text)
    try:
        try:
            print(line, file=stream, flush=True)
        except UnicodeEncodeError:
            encoding = getattr(stream, "encoding", None) or "ascii"
            print(line.encode(encoding, "backslashreplace").decode(encoding), file=stream, flush=True)
    except (BrokenPipeError, OSError, ValueError):  # ValueError: a closed stream
        _silence(stream)


def _silence(stream) -> None:
    """Point a dead stream at /dev/null, so Python's flush at exit does not print a second error."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def import_onnxruntime_quietly() -> None:
    """Import onnxruntime with its native stderr captured: for a user whose HOME is not writable it prints a
    telemetry warning (in ANSI colours) at import, which is no message of ours. Call before anything imports it."""
    from hnseg_infer.io.header import captured_native_stderr

    with captured_native_stderr():
        import onnxruntime  # noqa: F401


@contextmanager
def quiet_libraries(report_warning):
    """On the container path: onnxruntime logs errors only (its telemetry warning for an unwritable HOME comes in
    ANSI colours), ITK's warnings and matplotlib's log (its cache warning) are off, and Python warnings (numpy
    overflow) go to `report_warning` (the run report) instead of stderr."""
    import onnxruntime
    import SimpleITK as sitk

    onnxruntime.set_default_logger_severity(3)
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    logging.getLogger("matplotlib").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = lambda message, category, *_, **__: report_warning(
            f"{category.__name__}: {printable(message)}")
        yield
