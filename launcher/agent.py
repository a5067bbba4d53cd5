"""`python -m launcher.agent ARGS`: `accelerate launch ARGS` with torch elastic's agent made to
restart a job as one, and its reports made into one line each.

Restarts (`lrpt launch --max-restarts N`, the c10d rendezvous; launcher/launch.py says why
c10d). The node whose worker fails restarts its workers into a new rendezvous round; every
other node's agent sees the round waiting and restarts its own. torch counts only the first
kind against max_restarts, so each node would hold its own budget and its own
TORCHELASTIC_RESTART_COUNT. Counting both makes every node's count the job's: N bounds the
job's restarts, the nodes run out together (the last one's give-up closes the rendezvous for
the others), and every worker's TORCHELASTIC_RESTART_COUNT says which start of the job it is,
which the trainer records.

Reports. A restart is one line naming the failed rank and its cause (a signal, or the
exception the trainer wrote into torch elastic's error file); a run that fails for good is one
line and the failed worker's own exit code (85 = preempted, 2 = bad config), instead of
torch's ChildFailedError tables and tracebacks. torch elastic's agents also meet at an exit
barrier on the head node's store once their workers have finished; the head's agent can pass
it and exit, taking the store with it, before another agent's last read returns, and that
agent logs a DistNetworkError with a full traceback although every worker finished and its
exit code is 0. That record is kept, as one warning line."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

from torch.distributed.elastic.agent.server.api import WorkerState
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent


def say(line: str) -> None:
    print(f"[lrpt] {line}", file=sys.stderr, flush=True)


def describe(failure) -> str:
    """What ended one worker (torch elastic's ProcessFailure), in a few words."""
    if failure.exitcode < 0:
        return f"was killed by {failure.signal_name()}"
    # The trainer writes its error into torch elastic's error file (trainer/__main__.py); without
    # one, torch's message is only a pointer to its docs.
    message = _message(failure)
    first = message.strip().splitlines()[0][:300] if os.path.isfile(failure.error_file) and message.strip() else ""
    return f"exited with {failure.exitcode}" + (f": {first}" if first else "")


def _message(failure) -> str:
    return failure.message.get("message", "") if isinstance(failure.message, dict) else failure.message


def first_failure(failures: dict) -> tuple[int, object]:
    """(rank, failure) of the process whose failure caused the others. Once one has failed, torch
    stops the node's others (SIGTERM) and books them after the ones it found dead; among those,
    a process that failed because a peer vanished (gloo: "Connection reset by peer") is a
    consequence, however early. (torch's own "root cause" takes the earliest timestamp, whole
    seconds, and so often names one of those.)"""
    def lost_peer(f) -> bool:
        return os.path.isfile(f.error_file) and "by peer" in _message(f)
    ranks = list(failures)
    rank = min(ranks, key=lambda r: (lost_peer(failures[r]), ranks.index(r)))
    return rank, failures[rank]


def cause(failures: dict) -> str:
    rank, failure = first_failure(failures)
    return f"rank {rank} {describe(failure)}"


class JobRestartAgent(LocalElasticAgent):
    """torch elastic's agent with restarts counted per job (module docstring)."""

    _last = None
    restarts = 0  # this job's so far, for the final report

    def _monitor_workers(self, worker_group):
        self._last = super()._monitor_workers(worker_group)
        return self._last

    def _restart_workers(self, worker_group) -> None:
        spec = worker_group.spec
        if worker_group.state == WorkerState.HEALTHY:  # another node's failure opened a new round
            self._remaining_restarts = max(0, self._remaining_restarts - 1)
        JobRestartAgent.restarts = spec.max_restarts - self._remaining_restarts
        if worker_group.state != WorkerState.HEALTHY and self._last is not None and self._last.failures:
            say(f"node {worker_group.group_rank}: {cause(self._last.failures)}; restart "
                f"{JobRestartAgent.restarts} of at most {spec.max_restarts}: every node's "
                f"processes start again from the newest complete checkpoint")
        super()._restart_workers(worker_group)


class ExitBarrierOneLine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and str(record.msg).startswith("Error waiting on exit barrier"):
            error = record.exc_info[1]
            first = (str(error).strip().splitlines() or [""])[0]
            record.msg = (f"exit barrier: {type(error).__name__}: {first} (local workers had finished; "
                          f"the exit code is theirs)")
            record.args, record.exc_info, record.exc_text = (), None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def main() -> None:
    import torch.distributed.launcher.api as elastic_launcher
    from accelerate.commands.launch import main as accelerate_launch
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousClosedError

    elastic_launcher.LocalElasticAgent = JobRestartAgent  # what launch_agent builds
    logging.getLogger("torch.distributed.elastic.agent.server.api").addFilter(ExitBarrierOneLine())
    try:
        accelerate_launch()
    except ChildFailedError as e:
        code = first_failure(e.failures)[1].exitcode
        after = f" after {JobRestartAgent.restarts} restart(s), the most allowed" if JobRestartAgent.restarts else ""
        say(f"failed{after}: {cause(e.failures)}")
        sys.exit(code if code > 0 else 128 - code)  # a signal: the shell's 128 + N
    except RendezvousClosedError:
        say("failed: another node gave up (its lines name the cause) and closed the job's rendezvous")
        sys.exit(1)
    except subprocess.CalledProcessError as e:  # one process, no torch elastic: it said why itself
        sys.exit(e.returncode if e.returncode > 0 else 128 - e.returncode)
    sys.exit(0)


if __name__ == "__main__":
    main()
