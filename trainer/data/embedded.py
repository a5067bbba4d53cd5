"""The embedded default dataset: the generated corpus (trainer/data/corpus.py) prepared once
and cached, so that `lrpt train` with no argument needs no download and no `lrpt data prepare`.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

from trainer.data import corpus
from trainer.data.prepare import FORMAT_VERSION, _write_dataset

# A fixed seed, and a larger held-out share than real corpora need, so that validation gets a
# few dozen sequences from a corpus of well under a million tokens.
EMBEDDED_SEED = 0
EMBEDDED_VAL_FRACTION = 0.05
EMBEDDED_PAIRS_PER_PHENOMENON = 200


def pairs_per_phenomenon(sentences: int) -> int:
    """Minimal pairs per phenomenon: 200 for the default corpus, fewer for a small one (20 at
    2,000 sentences). Scoring them is a forward pass over every pair at every evaluation and
    at the end of each run: a quick run on a small corpus would spend more time there than
    training (1,000 pairs cost about 70 training steps of micro)."""
    return min(EMBEDDED_PAIRS_PER_PHENOMENON, max(20, sentences // 300))


def cache_dir() -> Path:
    return Path(os.environ.get("LRPT_CACHE") or Path.home() / ".cache" / "lowrank-pretrain").expanduser()


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive flock: only one process builds, the others wait and then reuse its result.
    (The atomic rename alone would already keep the result correct; the lock saves N-1 builds.)"""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def embedded_dataset(sentences: int, vocab_size: int, progress: bool = False) -> Path:
    """The prepared directory of the generated corpus, built on first use and cached under
    `$LRPT_CACHE` (default ~/.cache/lowrank-pretrain), named by a hash of everything it depends on."""
    key = json.dumps({"corpus": corpus.VERSION, "format": FORMAT_VERSION, "sentences": sentences,
                      "vocab": vocab_size, "seed": EMBEDDED_SEED, "val": EMBEDDED_VAL_FRACTION,
                      "pairs": pairs_per_phenomenon(sentences)}, sort_keys=True)
    root = cache_dir()
    out = root / f"embedded-{sentences}-{vocab_size}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (out / "index.json").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f"{out.name}.lock"):
        if (out / "index.json").is_file():  # another process built it while we waited
            return out
        if out.exists():  # not ours to explain: it has no index.json, so it is incomplete
            shutil.rmtree(out)
        t0 = time.time()
        tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            docs = corpus.generate_documents(sentences, EMBEDDED_SEED)
            _write_dataset(tmp, lambda: iter(docs),
                           source=f"embedded corpus v{corpus.VERSION}, {sentences} sentences",
                           tokenizer_path=None, vocab_size=vocab_size, val_fraction=EMBEDDED_VAL_FRACTION,
                           seed=EMBEDDED_SEED, shard_tokens=2**24, progress=progress)
            pairs = corpus.generate_minimal_pairs(pairs_per_phenomenon(sentences), EMBEDDED_SEED)
            with open(tmp / "minimal_pairs.jsonl", "w") as f:
                f.writelines(json.dumps(p) + "\n" for p in pairs)
            try:
                tmp.rename(out)
            except OSError:
                if not (out / "index.json").is_file():  # lost a race (no lock on this filesystem?)
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"built the embedded corpus in {time.time() - t0:.1f}s: {out}", file=sys.stderr)
    return out
