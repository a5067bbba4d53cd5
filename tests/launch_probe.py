"""One process of tests/test_launch.py's restart test, started by `lrpt launch` in place of the
trainer (`compose(module="tests.launch_probe")`): it records the environment the launcher gave
it, joins the gloo group and all-reduces three times; the rank named in LRPT_PROBE_DIE kills
itself with SIGKILL before the second all-reduce, on every start, as a rank with a deterministic
fault would; the others fail on the lost peer and write why into torch elastic's error file, as
the trainer does. Each start writes LRPT_PROBE_OUT/start-<restart>-<rank>.json."""
import json
import os
import signal

import torch
import torch.distributed as dist

from trainer.errors import record_for_launcher

KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
        "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS")
env = {k: os.environ.get(k) for k in KEYS}
out = os.path.join(os.environ["LRPT_PROBE_OUT"], f"start-{env['TORCHELASTIC_RESTART_COUNT']}-{env['RANK']}.json")
with open(out, "w") as f:
    json.dump(env, f)
dist.init_process_group("gloo")
for step in range(3):
    if step == 1 and dist.get_rank() == int(os.environ["LRPT_PROBE_DIE"]):
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        dist.all_reduce(torch.ones(1))
    except RuntimeError as e:  # a peer died: say so where the agent looks, as the trainer does
        record_for_launcher(e)
        raise
dist.destroy_process_group()
