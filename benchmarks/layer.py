"""One wrapped layer's forward+backward, fused vs the plain adapter path vs a full-rank
nn.Linear (W trains), at a named model's widths: where a low-rank step's time goes.

    python benchmarks/layer.py [--model llama-1b] [--tokens 1024] [--rank 128] [--reps 5]
"""
import argparse
import statistics
import time

import torch
import torch.nn as nn

from trainer.config import ModelConfig
from trainer.shapes import model_args
from trainer.strategies.lora import LoRALinear


def timed(fn, reps):
    fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-1b")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    args = model_args(ModelConfig(name=a.model), 256, 32000)
    x = torch.randn(a.tokens, args.hidden_size, requires_grad=True)
    full = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
    lora = LoRALinear(nn.Linear(args.hidden_size, args.intermediate_size, bias=False), a.rank, 0.25)
    lora.weight.requires_grad_(False)

    def step(m, plain=False):
        def run():
            if plain:  # the unfused adapter layer: what LoRALinear computed before fusing
                y = nn.functional.linear(x, m.weight) + m.scale * nn.functional.linear(
                    nn.functional.linear(x, m.lora_A), m.lora_B)
            else:
                y = m(x)
            y.sum().backward()
        return run
    res = {"full": timed(step(full), a.reps), "plain_lora": timed(step(lora, plain=True), a.reps),
           "fused_lora": timed(step(lora), a.reps)}
    print({k: f"{v * 1e3:.1f} ms" for k, v in res.items()},
          f"fused/full speed {res['full'] / res['fused_lora']:.2f}x, plain/full {res['full'] / res['plain_lora']:.2f}x")


if __name__ == "__main__":
    main()
