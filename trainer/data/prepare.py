"""Building a prepared dataset: text -> byte-level BPE -> packed token shards.

A prepared dataset is a directory:
    index.json          format, dtype, vocab_size, eos_id, per split its shards and token counts
    tokenizer.json      a `tokenizers` byte-level BPE (or the one the user gave)
    {split}_{k:05d}.bin flat uint16 (vocab <= 65536) or uint32 token streams; each document is
                        followed by EOS, and a document may continue into the next shard
    minimal_pairs.jsonl (embedded corpus only) BLiMP-format pairs for evaluation

Sources for `prepare`: a `.txt` file (one document per paragraph, lines up to a blank line;
or per line, or per file: `unit`), a `.jsonl` file (one JSON object per line, text in `text_field`), a `.parquet`
file (column `text_field`, read through `datasets`), a directory (every such file under it,
in sorted order), or anything else: a Hugging Face dataset name for `datasets.load_dataset`.

Directories are built under `<out>.tmp-<pid>` and renamed into place, so a crash never
leaves a half-written directory that looks complete, and concurrent builders of the embedded
corpus cannot corrupt each other. Reading one is trainer/data/loader.py's job.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import deque
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from trainer.data.sources import UNITS, check_text, documents_of, resolve_sources
from trainer.errors import DataError

FORMAT_VERSION = 1
EOS = "<|endoftext|>"
EOS_CANDIDATES = (EOS, "</s>", "<|end_of_text|>", "<eos>")  # accepted in a user's tokenizer.json
SPLITS = ("train", "val")
TOKENIZER_MAX_CHARS = 1 << 30  # BPE is trained on at most the first ~1 GB of text: plenty, and bounded
# One evaluation batch at the default data.batch_size (16) x data.seq_len (128), plus the
# shifted target: less, and training stops at its first evaluation.
MIN_VAL_TOKENS = 16 * 128 + 1


# ---------------------------------------------------------------------------------------------
# Tokenizer

def train_tokenizer(documents: Iterable[str], vocab_size: int, progress: bool = False):
    """Byte-level BPE with EOS as its only special token. Deterministic for the same text
    (checked: identical tokenizer.json across thread counts and hash seeds), which lets every
    node of a multi-node run build the same embedded corpus without talking to the others."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()  # decode(encode(text)) == text, byte for byte
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(documents, trainer)
    return tok


def load_tokenizer(path: str | Path):
    from tokenizers import Tokenizer

    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"tokenizer file {str(path)!r} not found")
    return Tokenizer.from_file(str(path))


def _eos_of(tok, where: str) -> tuple[str, int]:
    for token in EOS_CANDIDATES:
        if (i := tok.token_to_id(token)) is not None:
            return token, i
    raise DataError(f"{where}: the tokenizer has no end-of-text token (looked for {', '.join(EOS_CANDIDATES)})")


# ---------------------------------------------------------------------------------------------
# Writing a prepared directory

def _is_val(index: int, seed: int, fraction: float) -> bool:
    """Whole documents go to val by a hash of (seed, document index): stable, no RNG state."""
    h = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") < fraction * 2.0**64


class _ShardWriter:
    """Appends to `{split}_{k:05d}.bin`, starting a new shard every `shard_tokens` tokens."""

    def __init__(self, root: Path, split: str, dtype, shard_tokens: int):
        self.root, self.split, self.dtype, self.shard_tokens = root, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.documents = 0
        self._f = None

    def write(self, ids: np.ndarray) -> None:
        self.documents += 1
        while len(ids):
            if self._f is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self.close()
                self.shards.append({"file": f"{self.split}_{len(self.shards):05d}.bin", "tokens": 0})
                self._f = open(self.root / self.shards[-1]["file"], "wb")
            part = ids[: self.shard_tokens - self.shards[-1]["tokens"]]
            self._f.write(part.astype(self.dtype, copy=False).tobytes())
            self.shards[-1]["tokens"] += len(part)
            ids = ids[len(part):]

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def summary(self) -> dict:
        return {"tokens": sum(s["tokens"] for s in self.shards), "documents": self.documents,
                "shards": self.shards}


def _write_dataset(dst: Path, documents: Callable[[], Iterator[str]], *, source: str,
                   tokenizer_path: str | None, vocab_size: int, val_fraction: float, seed: int,
                   shard_tokens: int, progress: bool, min_val_tokens: int = 1) -> dict:
    """Tokenize `documents()` (called once or twice: it must replay the same documents) into
    shards under `dst`; write tokenizer.json and index.json last. Returns the index."""
    from tqdm import tqdm

    total = None
    if tokenizer_path:
        tok = load_tokenizer(tokenizer_path)
        shutil.copyfile(Path(tokenizer_path).expanduser(), dst / "tokenizer.json")
    else:
        counted = {"docs": 0, "chars": 0, "complete": True}

        def sample() -> Iterator[str]:
            for doc in documents():
                if counted["chars"] >= TOKENIZER_MAX_CHARS:
                    counted["complete"] = False
                    return
                counted["docs"] += 1
                counted["chars"] += len(doc)
                yield doc

        tok = train_tokenizer(sample(), vocab_size, progress)
        if counted["docs"] == 0:
            raise DataError(f"empty corpus: no non-empty documents in {source}")
        total = counted["docs"] if counted["complete"] else None
        tok.save(str(dst / "tokenizer.json"))
    eos_token, eos_id = _eos_of(tok, tokenizer_path or "trained tokenizer")
    vocab = tok.get_vocab_size(with_added_tokens=True)
    dtype = np.uint16 if vocab <= 2**16 else np.uint32
    writers = {s: _ShardWriter(dst, s, dtype, shard_tokens) for s in SPLITS}
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # fast: skips offsets

    # The newest train documents (about min_val_tokens of them) are held back: if the hash gave
    # val too few tokens for one evaluation (a small corpus), they top it up at the end.
    held: deque[np.ndarray] = deque()
    held_tokens = 0
    index = 0
    bar = tqdm(total=total, unit="doc", desc="tokenizing", disable=not progress, mininterval=0.5)
    chunk: list[str] = []
    stream = documents()
    while True:
        chunk.clear()
        for doc in stream:
            chunk.append(doc)
            if len(chunk) == 1024:
                break
        if not chunk:
            break
        for enc in encode(chunk):
            ids = np.array(enc.ids + [eos_id], dtype=np.int64)
            if _is_val(index, seed, val_fraction):
                writers["val"].write(ids)
            else:
                held.append(ids)
                held_tokens += len(ids)
                while held and held_tokens - len(held[0]) >= min_val_tokens:
                    held_tokens -= len(held[0])
                    writers["train"].write(held.popleft())
            index += 1
        bar.update(len(chunk))
    bar.close()
    val_tokens = sum(s["tokens"] for s in writers["val"].shards)
    keep = 0 if writers["train"].documents else 1  # never the last training document
    topped_up = 0
    while val_fraction > 0 and val_tokens < min_val_tokens and len(held) > keep:
        val_tokens += len(held[-1])
        writers["val"].write(held.pop())
        topped_up += 1
    for ids in held:
        writers["train"].write(ids)
    for w in writers.values():
        w.close()
    if not writers["train"].documents:
        raise DataError(f"empty corpus: no training documents in {source}")
    if val_fraction > 0 and val_tokens < min_val_tokens:
        docs = writers["train"].documents + writers["val"].documents
        raise DataError(f"too little text for a validation split: {source} gives {docs} document(s), and "
                        f"validation needs {min_val_tokens:,} tokens (one evaluation batch) on top of at least "
                        f"one training document; add text, split .txt files finer (--unit line), or lower "
                        f"--min-val-tokens")
    meta = {
        "format": FORMAT_VERSION, "dtype": np.dtype(dtype).name, "vocab_size": vocab,
        "eos_id": eos_id, "eos_token": eos_token, "tokenizer": "tokenizer.json", "source": source,
        "seed": seed, "val_fraction": val_fraction, "shard_tokens": shard_tokens,
        "splits": {s: w.summary() for s, w in writers.items()}, "val_topped_up": topped_up,
    }
    (dst / "index.json").write_text(json.dumps(meta, indent=1) + "\n")  # last: marks it complete
    return meta


def _is_nonempty_dir(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def prepare(sources: list[str], out_dir: str | Path, *, tokenizer_path: str | None = None,
            vocab_size: int = 8192, val_fraction: float = 0.005, text_field: str = "text",
            hf_split: str = "train", hf_config: str | None = None, streaming: bool | None = None,
            max_documents: int | None = None, seed: int = 0, shard_tokens: int = 2**24,
            overwrite: bool = False, progress: bool = True, unit: str = "paragraph",
            min_val_tokens: int = MIN_VAL_TOKENS, encoding: str = "utf-8", skip_undecodable: bool = False) -> Path:
    """Tokenize `sources` (see the module docstring for the kinds) into a prepared directory.

    tokenizer_path: a tokenizer.json to use as is (copied; `vocab_size` is then ignored); else a
    byte-level BPE of `vocab_size` is trained on the documents (the first ~1 GB of text).
    val_fraction: the share of whole documents held out as "val", chosen by a hash of (seed,
    document index). If that gives val fewer than `min_val_tokens` tokens, the last training
    documents move there; a corpus too small for that is refused (DataError), never left with
    an empty or useless val split. unit: what one document of a .txt file is: a "paragraph"
    (lines up to a blank line), a "line", or the whole "file".
    text_field: the JSON field / column holding the text. hf_split, hf_config, streaming: passed
    to `datasets.load_dataset` (streaming=None streams). max_documents: stop after this many.
    shard_tokens: tokens per shard file. overwrite: replace an existing non-empty `out_dir`.
    encoding: of the .txt/.jsonl files; a file that does not decode (or holds a NUL byte) is
    refused with its byte offset, or left out with skip_undecodable (index.json lists it).
    """
    sources = [str(sources)] if isinstance(sources, (str, Path)) else [str(s) for s in sources]
    out = Path(out_dir).expanduser()
    if _is_nonempty_dir(out) and not overwrite:
        raise DataError(f"output directory {str(out)!r} exists and is not empty "
                        f"(pass overwrite=True, or --overwrite to `lrpt data prepare`, to replace it)")
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction={val_fraction}: expected 0 <= val_fraction < 1")
    if unit not in UNITS:
        raise DataError(f"unit={unit!r}: expected one of {', '.join(UNITS)}")
    if shard_tokens < 1:
        raise DataError(f"shard_tokens={shard_tokens}: expected >= 1")
    resolved, skipped = check_text(resolve_sources(sources), encoding, skip_undecodable)
    source = ", ".join(sources)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        meta = _write_dataset(tmp, lambda: documents_of(resolved, text_field, hf_split, hf_config, streaming,
                                                      max_documents, unit, encoding),
                              source=source, tokenizer_path=tokenizer_path, vocab_size=vocab_size,
                              val_fraction=val_fraction, seed=seed, shard_tokens=shard_tokens, progress=progress,
                              min_val_tokens=min_val_tokens)
        if skipped:  # rewritten, still last: index.json marks the directory complete
            meta["skipped"] = skipped
            (tmp / "index.json").write_text(json.dumps(meta, indent=1) + "\n")
        old = None
        if out.exists():
            if _is_nonempty_dir(out):
                if not overwrite:
                    raise DataError(f"output directory {str(out)!r} appeared while preparing; not replacing it")
                old = out.with_name(f"{out.name}.old-{os.getpid()}")
                out.rename(old)
            else:
                out.rmdir()
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
