"""`python -m trainer [CONFIG] [key=value ...]`: one training process. `lrpt train` calls
`main`, and `lrpt launch` / the SLURM script start this module in every process."""
from __future__ import annotations

import os
import sys


def split_config_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """`[CONFIG] [key=value ...]`: the first item is a YAML path unless it is an override."""
    if argv and "=" not in argv[0]:
        return argv[0], list(argv[1:])
    return None, list(argv)


def main(argv: list[str] | None = None) -> int:
    from trainer.errors import EXIT_PREEMPTED, exit_code, message

    argv = sys.argv[1:] if argv is None else argv
    try:
        from trainer.config import load_config
        from trainer.loop import train

        path, overrides = split_config_args(argv)
        train(load_config(path, overrides))
    except Exception as e:  # noqa: BLE001 - mapped to one line and an exit code, or re-raised
        code = exit_code(e)
        if code is None:
            raise
        if code != EXIT_PREEMPTED:  # a preemption has already said what it did
            print(message(e), file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
