"""What can stop a run, and the exit code each stop gives. Torch-free: the launcher (and the
SLURM script it renders) read the codes without importing the trainer.

One map from exception to exit code serves `lrpt train`, `python -m trainer` and every other
`lrpt` verb, so a user error is one line on stderr and a known code everywhere.
"""
from __future__ import annotations

import atexit
import json
import os
import sys
import time
import traceback
import warnings

EXIT_OK = 0
EXIT_FAILED = 1  # the run failed (a non-finite loss, ranks out of step)
EXIT_USAGE = 2  # bad config, bad data, missing file: nothing was trained
EXIT_PREEMPTED = 85  # stopped on SIGUSR1/SIGTERM with a checkpoint written: requeue me


class ConfigError(ValueError):
    """A bad key, type or value in a config file or override."""


class DataError(ValueError):
    """A problem with a data source, a prepared directory or a loader's arguments."""


class DistributedError(RuntimeError):
    """A set-up that would train wrongly (e.g. independent single processes)."""


class ConsistencyError(RuntimeError):
    """Ranks hold different weights."""


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; nothing was saved over the last good checkpoint."""


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (held by another run, changed settings, no
    usable checkpoint): refused before anything in it was touched."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, read-only; the previous one stays latest),
    or a file was refused unread (its pickle would run code)."""


def refused_pickle(path, e: Exception) -> CheckpointError:
    """One line for a file that torch.load(weights_only=True) refused: which global it names."""
    lines = str(e).splitlines()
    why = next((x.strip() for x in lines if "GLOBAL" in x or "Unsupported" in x), lines[0] if lines else "")
    return CheckpointError(f"refusing to load {path}: its pickle is not plain data ({why})")


class Preempted(Exception):
    """Raised after the preemption checkpoint is written."""


def exit_code(exc: BaseException) -> int | None:
    """The exit code for an exception the user should see as one line; None for a bug (let
    the traceback through)."""
    if isinstance(exc, Preempted):
        return EXIT_PREEMPTED
    if isinstance(exc, (ConfigError, DataError, DistributedError, RunDirError, FileNotFoundError)):
        return EXIT_USAGE
    if isinstance(exc, (NonFiniteLoss, ConsistencyError, CheckpointError)):
        return EXIT_FAILED
    return None


def message(exc: BaseException) -> str:
    """The one line printed for `exc` (config errors say so, the rest are plain errors)."""
    return f"{'config error' if isinstance(exc, ConfigError) else 'error'}: {exc}"


def record_for_launcher(exc: BaseException) -> None:
    """Under torch elastic (lrpt launch, accelerate launch, torchrun), write why this process
    failed into the error file the agent named (TORCHELASTIC_ERROR_FILE): its report of the
    failed rank then gives the cause instead of "To enable traceback see ...". The format is
    torch's (ErrorHandler.record_exception), written here without importing torch."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    with open(path, "w") as f:
        json.dump({"message": {"message": f"{type(exc).__name__}: {exc}", "extraInfo": {
            "py_callstack": "".join(traceback.format_exception(exc)), "timestamp": str(int(time.time()))}}}, f)


_OURS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_line_warnings() -> None:
    """Warnings on one line: ours as `warning: ...` (they are messages to the user), others
    with where they came from but without the echoed source line."""
    def formatwarning(msg, category, filename, lineno, line=None):
        if os.path.abspath(filename).startswith(_OURS + os.sep) and ".venv" not in filename:
            return f"warning: {msg}\n"
        return f"{filename}:{lineno}: {category.__name__}: {msg}\n"
    warnings.formatwarning = formatwarning


def exit_process(code: int):
    """End a training process with `code` once its work is done, skipping the interpreter's
    finalization (atexit handlers still run, while the interpreter is whole).

    Why: a process group that DDP's reducer or DeepSpeed still references outlives
    destroy_process_group, and its gloo worker threads can still be releasing the last
    collective's tensors when the interpreter finalizes. Freeing a tensor that Python held
    takes the GIL; a thread that asks for it during finalization is ended by pthread_exit
    inside a noexcept frame: std::terminate ("terminate called without an active exception"),
    SIGABRT, a failed exit after a finished run (pytorch issue 190489; a few launches in a
    hundred on a loaded 2-core machine)."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
