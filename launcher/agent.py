"""`python -m launcher.agent ARGS`: `accelerate launch ARGS`, with one upstream log record
made honest.

torch elastic's agents meet at an exit barrier on the head node's store once their workers
have finished. The head's agent can pass the barrier and exit, taking the store with it,
before another agent's last read returns; that agent then logs a DistNetworkError with a full
traceback although every worker finished and its exit code is 0. In a SLURM log the traceback
reads as a crash. The record is kept, as one warning line."""
from __future__ import annotations

import logging
import sys


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
    from accelerate.commands.launch import main as accelerate_launch

    logging.getLogger("torch.distributed.elastic.agent.server.api").addFilter(ExitBarrierOneLine())
    sys.exit(accelerate_launch())


if __name__ == "__main__":
    main()
