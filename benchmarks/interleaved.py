"""Strategies measured side by side in one process, one step of each in turn, so that load
from other work on a shared machine falls on all of them alike (`lrpt bench` runs them one
after another in fresh processes, and minutes of drift between them swamp the ratios).

    python benchmarks/interleaved.py --model micro --rounds 30 [--set key=value ...]
Prints JSON: median step time and tokens/s per strategy and the ratios against full rank.
"""
import argparse
import json
import statistics
import tempfile
import time

STRATEGIES = {"full": ["strategy.name=full"], "relora": ["strategy.name=relora"],
              "switchlora": ["strategy.name=switchlora"]}


def main():
    from trainer.config import load_config
    from trainer.loop import Trainer

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="micro")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--set", nargs="*", default=[])
    a = ap.parse_args()
    tmp = tempfile.mkdtemp()
    trainers, times = {}, {}
    for name, over in STRATEGIES.items():
        cfg = load_config(None, [f"model.name={a.model}", "logging.progress=false", "logging.tensorboard=false",
                                 f"train.max_steps={a.rounds + 10}", f"run.dir={tmp}/{name}", *over, *a.set])
        trainers[name], times[name] = Trainer(cfg), []
    warm = max(1, a.rounds // 4)
    for r in range(a.rounds):
        for name, t in trainers.items():
            t0 = time.perf_counter()
            loss, _ = t._train_step(r + 1)
            float(loss)  # the step's one host read (fit's all-reduce)
            t.strategy.after_step(r + 1, __import__("trainer.strategies.base", fromlist=["x"]).StepContext(
                engine=t.engine, max_steps=a.rounds + 10))
            if r >= warm:
                times[name].append(time.perf_counter() - t0)
    out = {}
    for name, t in trainers.items():
        step = statistics.median(times[name])
        out[name] = {"step_time_s": step, "tokens_per_s": t.tokens_per_step / step}
    out["relora_vs_full"] = out["relora"]["tokens_per_s"] / out["full"]["tokens_per_s"]
    out["switchlora_vs_relora"] = out["switchlora"]["tokens_per_s"] / out["relora"]["tokens_per_s"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
