"""Held-out perplexity and minimal-pair (BLiMP-format) accuracy.

A minimal pair is two sentences differing in one place, one grammatical; the model is right
when it gives the grammatical one the higher total log-probability (BLiMP's metric, as in
lm-evaluation-harness). Every sentence is scored after an EOS token: training joins documents
with EOS, so EOS is the model's start-of-text context and the first word gets scored too.
"""
from __future__ import annotations

import contextlib
import json
import math
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F


def validation_batches(data, cfg, rank: int = 0, world_size: int = 1) -> list:
    """This rank's share of the validation set: the first `logging.eval_batches` batches of
    `data.batch_size` sequences of the val split, in order, whatever the world size (rank r
    takes batches r, r + n, ...), so a validation loss means the same at any scale."""
    from trainer.data import eval_batches

    batches = eval_batches(data, "val", cfg.data.seq_len, cfg.data.batch_size, 0, 1, cfg.logging.eval_batches)
    return batches[rank::world_size]


@torch.no_grad()
def validation_loss(model, batches, device, *, autocast=contextlib.nullcontext, all_reduce: bool = False) -> dict:
    """{"val_loss": token-weighted mean cross-entropy, "val_ppl": its exp} over (x, y)
    batches, in the training precision (`autocast`: a context factory). With `all_reduce`
    every rank passes its own batches and gets the global figures. The one validation
    routine: training records and `lrpt eval` both call it."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, token count
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        n = (y != -100).sum()
        with autocast():
            loss = model(x, y)
        total += torch.stack([loss.double() * n, n.double()])
    if all_reduce:
        torch.distributed.all_reduce(total)
    model.train(was_training)
    mean = float(total[0] / total[1])
    return {"val_loss": mean, "val_ppl": math.exp(min(mean, 700.0))}  # exp overflows a float past ~709


@torch.no_grad()
def sequence_logprob(model, token_ids_list, bos_id: int, device, batch_size: int = 64) -> list[float]:
    """Total log-probability of each token sequence, each scored after `bos_id`."""
    was_training = model.training
    model.eval()
    scores = [0.0] * len(token_ids_list)
    # Length-sorted batches waste little on padding; results go back in the caller's order.
    order = sorted(range(len(token_ids_list)), key=lambda i: len(token_ids_list[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        seqs = [[bos_id, *token_ids_list[i]] for i in idx]
        width = max(map(len, seqs))
        # Right padding: a causal model never sees it from the real positions.
        inp = torch.tensor([s + [bos_id] * (width - len(s)) for s in seqs], device=device)
        mask = torch.tensor([[1.0] * (len(s) - 1) + [0.0] * (width - len(s)) for s in seqs], device=device)
        logp = F.log_softmax(model(inp[:, :-1]).float(), dim=-1)
        token_logp = logp.gather(-1, inp[:, 1:, None]).squeeze(-1)
        for i, s in zip(idx, (token_logp * mask).sum(1).tolist()):
            scores[i] = s
    model.train(was_training)
    return scores


def _encode(tokenizer, text: str) -> list[int]:
    # tokenizers.Tokenizer returns an Encoding, a transformers tokenizer a list of ids.
    enc = tokenizer.encode(text, add_special_tokens=False)
    return list(enc.ids if hasattr(enc, "ids") else enc)


def minimal_pair_accuracy(model, tokenizer, pairs: list[dict], bos_id: int, device,
                          batch_size: int = 64) -> dict[str, float]:
    """{"overall": accuracy, "<phenomenon>": accuracy, ...}; a tie counts as wrong."""
    ids = [_encode(tokenizer, p[k]) for p in pairs for k in ("sentence_good", "sentence_bad")]
    limit = getattr(getattr(model, "args", None), "max_seq_len", None)
    if limit is not None:  # a sentence (plus its BOS) longer than the context cannot be scored
        keep = [i for i in range(len(pairs)) if max(len(ids[2 * i]), len(ids[2 * i + 1])) < limit]
        if len(keep) < len(pairs):
            import warnings
            warnings.warn(f"{len(pairs) - len(keep)} of {len(pairs)} minimal pairs are longer than the model's "
                          f"context ({limit} tokens) and were skipped")
            pairs = [pairs[i] for i in keep]
            ids = [ids[j] for i in keep for j in (2 * i, 2 * i + 1)]
    scores = sequence_logprob(model, ids, bos_id, device, batch_size)
    hits = defaultdict(list)
    for p, good, bad in zip(pairs, scores[0::2], scores[1::2]):
        hits[p.get("phenomenon", "all")].append(good > bad)
    out = {"overall": sum(sum(h) for h in hits.values()) / max(1, len(pairs))}
    out.update({name: sum(h) / len(h) for name, h in sorted(hits.items())})
    return out


def load_minimal_pairs(path: str | Path) -> list[dict]:
    """Pairs from a JSONL file or a directory of them (BLiMP ships one file per paradigm).
    The phenomenon is the `phenomenon` field, else BLiMP's `linguistics_term` (its 12
    phenomena; `UID`, the paradigm, is kept as `uid`), else the file's stem."""
    path = Path(path)
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"{path}: no *.jsonl minimal-pair files")
    pairs = []
    for f in files:
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "sentence_good" not in row or "sentence_bad" not in row:
                raise ValueError(f"{f}:{n}: expected sentence_good and sentence_bad")
            pairs.append({"sentence_good": row["sentence_good"], "sentence_bad": row["sentence_bad"],
                          "phenomenon": row.get("phenomenon") or row.get("linguistics_term") or f.stem,
                          **({"uid": row["UID"]} if "UID" in row else {})})
    return pairs


def minimal_pairs_record(model, data, device, pairs_path=None) -> dict:
    """{"blimp_acc": overall, "blimp/<phenomenon>": ...} on `pairs_path` (default: the
    dataset's own pairs, which the embedded corpus has), or {} when there are none."""
    pairs_path = pairs_path or data.minimal_pairs_path
    if not pairs_path:
        return {}
    acc = minimal_pair_accuracy(model, data.tokenizer, load_minimal_pairs(pairs_path), data.eos_id, device)
    return {"blimp_acc": acc.pop("overall"), **{f"blimp/{k}": v for k, v in acc.items()}}


def evaluate_checkpoint(path, *, data_dir=None, pairs=None, device="cpu") -> dict:
    """Validation loss/perplexity and minimal-pair accuracy of a run's latest checkpoint (or
    a given one), adapters merged: the figures the run logs, on the same validation set in
    the same precision. Keys match metrics.jsonl: step, val_loss, val_ppl, blimp_acc,
    blimp/<phenomenon>. `pairs`: a JSONL file or directory."""
    from trainer.checkpoint import load_model, step_of
    from trainer.data import PreparedData, resolve_dataset
    from trainer.distributed import mixed_precision

    model, cfg, ckpt = load_model(path, device)
    data = PreparedData(Path(data_dir) if data_dir else resolve_dataset(cfg.data))
    bf16 = mixed_precision(cfg, torch.device(device).type) == "bf16"
    autocast = (lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16)) if bf16 \
        else contextlib.nullcontext
    out = {"step": step_of(ckpt), "checkpoint": str(ckpt),
           **validation_loss(model, validation_batches(data, cfg), device, autocast=autocast)}
    out.update(minimal_pairs_record(model, data, device, pairs))
    return out
