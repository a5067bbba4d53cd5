"""`python -m trainer [CONFIG] [key=value ...]`: one training process. `lrpt train` calls
`main`, and `lrpt launch` / the SLURM script start this module in every process."""
from __future__ import annotations

import os
import signal
import sys
import threading

from trainer.errors import EXIT_PREEMPTED, exit_process, one_line_warnings  # torch-free: ready before the slow imports


def split_config_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """`[CONFIG] [key=value ...]`: the first item is a YAML path unless it is an override."""
    if argv and "=" not in argv[0]:
        return argv[0], list(argv[1:])
    return None, list(argv)


EXIT_INTERRUPTED = 130  # the shell's code for a Ctrl-C


def _stop_during_startup(signum, frame):
    # Exit here rather than raise: the signal lands mostly inside an import, and an exception
    # thrown there can be swallowed by a library and leave a module half-imported (numpy's
    # lazy submodules then recurse forever). Nothing is written yet; the kernel drops the lock.
    print(f"error: stopped by {signal.Signals(signum).name} during start-up, before the first step: "
          f"nothing to save; run the same command to start again", file=sys.stderr, flush=True)
    sys.stdout.flush()
    # Under a batch script (LRPT_PREEMPT_EXIT, see _mark_preempted) the script saw the signal
    # itself and requeues; exit 85 would make torch elastic restart this process instead.
    os._exit(int(os.environ.get("LRPT_PREEMPT_EXIT", EXIT_PREEMPTED)))


def main(argv: list[str] | None = None) -> int:
    # Until the loop installs its own handlers, a preemption signal means "nothing done yet":
    # one line and the requeue code, not a traceback from somewhere inside an import.
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            previous[sig] = signal.signal(sig, _stop_during_startup)
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("interrupted: stopped at once; resume from the last checkpoint with the same command", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _mark_preempted(run_dir: str, code: int) -> int:
    """Under a launcher that reports any non-zero exit as a crash (torch elastic's
    ChildFailedError traceback, srun's "exited with exit code 1"), the sbatch template sets
    LRPT_PREEMPT_EXIT=0: the run directory's `preempted` file then tells the batch script to
    requeue. By hand, exit 85 says it."""
    exit_as = os.environ.get("LRPT_PREEMPT_EXIT")
    if exit_as is None:
        return code
    if os.environ.get("RANK", "0") == "0":
        with open(os.path.join(run_dir, "preempted"), "w") as f:
            f.write(f"{code}\n")
        print(f"preempted: exit {exit_as} instead (LRPT_PREEMPT_EXIT); {os.path.join(run_dir, 'preempted')} "
              f"tells the batch script to requeue", flush=True)
    return int(exit_as)


def _main(argv: list[str] | None) -> int:
    from trainer.errors import Preempted, exit_code, message, record_for_launcher

    argv = sys.argv[1:] if argv is None else argv
    try:
        from trainer.config import load_config

        path, overrides = split_config_args(argv)
        cfg = load_config(path, overrides)  # before torch is imported: a typo costs a second, not ten
        from trainer.loop import train

        train(cfg)
    except Exception as e:  # noqa: BLE001 - mapped to one line and an exit code, or re-raised
        code = exit_code(e)
        if code != EXIT_PREEMPTED:
            record_for_launcher(e)
        if code is None:
            raise
        if code != EXIT_PREEMPTED:  # a preemption has already said what it did
            print(message(e), file=sys.stderr)
        elif isinstance(e, Preempted):  # it carries the run directory
            code = _mark_preempted(str(e), code)
        return code
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    one_line_warnings()
    exit_process(main())
