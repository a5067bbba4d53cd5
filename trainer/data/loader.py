"""Reading a prepared dataset (see trainer/data/prepare.py for its layout): the token
streams, and a resumable, rank-sharded batch loader that the loop reads every step.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from trainer.data.embedded import embedded_dataset
from trainer.data.prepare import FORMAT_VERSION, load_tokenizer
from trainer.errors import DataError

if TYPE_CHECKING:
    import torch


def resolve_dataset(data_cfg) -> Path:
    """`data.source` -> a prepared directory: "embedded" builds (once) the generated corpus."""
    if data_cfg.source == "embedded":
        return embedded_dataset(data_cfg.embedded_sentences, data_cfg.embedded_vocab)
    path = Path(data_cfg.source).expanduser()
    if not (path / "index.json").is_file():
        raise DataError(f"data.source={data_cfg.source!r}: not a prepared dataset (no {path / 'index.json'}); "
                        f"make one with `lrpt data prepare SOURCE... --out {data_cfg.source}`, "
                        f"or use data.source=embedded")
    return path


# ---------------------------------------------------------------------------------------------
# Reading a prepared directory

class TokenStream:
    """One split's shards as one sequence of tokens: np.memmap per shard, and slices that
    cross a shard boundary are stitched by index arithmetic (only the slice is copied)."""

    def __init__(self, root: Path, shards: list[dict], dtype: np.dtype):
        self._maps = []
        for s in shards:
            path = root / s["file"]
            expected = s["tokens"] * dtype.itemsize
            if not path.is_file() or path.stat().st_size != expected:
                raise DataError(f"{path}: missing or truncated (expected {expected} bytes); prepare the data again")
            self._maps.append(np.memmap(path, dtype=dtype, mode="r", shape=(s["tokens"],)))
        self._starts = np.cumsum([0] + [len(m) for m in self._maps])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice):
            raise TypeError("TokenStream supports slices only, e.g. tokens[i:j]")
        start, stop, step = key.indices(len(self))
        if step != 1 or stop <= start:
            return np.zeros(0, dtype=self._maps[0].dtype) if self._maps else np.zeros(0, np.uint16)
        k = int(np.searchsorted(self._starts, start, side="right")) - 1
        pieces = []
        while start < stop:
            lo, hi = self._starts[k], self._starts[k + 1]
            pieces.append(self._maps[k][start - lo: min(stop, hi) - lo])
            start = min(stop, hi)
            k += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


class PreparedData:
    """A prepared directory: its index, tokenizer (loaded on first use) and token streams."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        index_path = self.path / "index.json"
        if not index_path.is_file():
            raise DataError(f"{str(self.path)!r} is not a prepared dataset (no index.json); "
                            f"make one with `lrpt data prepare`")
        self.index = json.loads(index_path.read_text())
        if self.index.get("format") != FORMAT_VERSION:
            raise DataError(f"{index_path}: format {self.index.get('format')}, this code reads "
                            f"format {FORMAT_VERSION}; prepare the data again")
        self.vocab_size: int = self.index["vocab_size"]
        self.eos_id: int = self.index["eos_id"]
        self.dtype = np.dtype(self.index["dtype"])
        self._tokenizer = None
        self._streams: dict[str, TokenStream] = {}

    def _split(self, split: str) -> dict:
        if split not in self.index["splits"]:
            raise DataError(f"{self.path}: no split {split!r} (has {', '.join(self.index['splits'])})")
        return self.index["splits"][split]

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.path / self.index["tokenizer"])
        return self._tokenizer

    def num_tokens(self, split: str) -> int:
        return self._split(split)["tokens"]

    def num_documents(self, split: str) -> int:
        return self._split(split)["documents"]

    @property
    def minimal_pairs_path(self) -> Path | None:
        path = self.path / "minimal_pairs.jsonl"
        return path if path.is_file() else None

    def tokens(self, split: str) -> TokenStream:
        if split not in self._streams:
            self._streams[split] = TokenStream(self.path, self._split(split)["shards"], self.dtype)
        return self._streams[split]


def describe(path: str | Path) -> str:
    """A few lines for `lrpt data describe`: source, tokenizer, tokens and shards per split."""
    d = PreparedData(path)
    lines = [f"{d.path}", f"  source: {d.index['source']}",
             f"  tokenizer: {d.index['tokenizer']} (vocab {d.vocab_size}, "
             f"eos {d.index['eos_token']!r} = {d.eos_id}), tokens stored as {d.dtype.name}"]
    for split, s in d.index["splits"].items():
        docs = "1 document" if s["documents"] == 1 else f"{s['documents']:,} documents"
        lines.append(f"  {split}: {s['tokens']:,} tokens, {docs}, "
                     f"{len(s['shards'])} shard(s)")
    if d.minimal_pairs_path:
        with open(d.minimal_pairs_path) as f:
            phenomena = [json.loads(line)["phenomenon"] for line in f]
        lines.append(f"  minimal pairs: {len(phenomena):,} in {len(set(phenomena))} phenomena "
                     f"({d.minimal_pairs_path.name})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Batches

def _window(tokens: TokenStream, i: int, seq_len: int) -> np.ndarray:
    return tokens[i * seq_len: i * seq_len + seq_len + 1]


def _to_xy(windows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    import torch  # here, not at the top: `lrpt data prepare` and the cache builder do not need it

    w = torch.from_numpy(np.stack(windows).astype(np.int64))
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def _num_sequences(data: PreparedData, split: str, seq_len: int) -> int:
    # Sequence i is tokens[i*seq_len : (i+1)*seq_len + 1]: consecutive windows share one token,
    # so every token is a target exactly once per epoch.
    return max(0, (data.num_tokens(split) - 1) // seq_len)


class BatchLoader:
    """Rank `rank`'s micro-batches: each `next_batch()` takes one global micro-batch of
    batch_size * world_size sequences from a per-epoch seeded permutation; rank r takes the
    r-th slice. The state is one integer (global micro-batches consumed), so a resumed loader
    returns exactly the batches the uninterrupted one would have."""

    def __init__(self, data: PreparedData, split: str, seq_len: int, batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0):
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} not in [0, world_size={world_size})")
        self.data, self.split, self.seq_len, self.batch_size = data, split, seq_len, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.tokens = data.tokens(split)
        self.num_sequences = _num_sequences(data, split, seq_len)
        self.global_batch = batch_size * world_size
        # Each epoch drops the permutation's remainder (< one global batch) so all ranks stay in step.
        self.steps_per_epoch = self.num_sequences // self.global_batch
        if self.steps_per_epoch == 0:
            raise DataError(
                f"split {split!r} of {data.path} has {data.num_tokens(split):,} tokens = {self.num_sequences} "
                f"sequences of seq_len {seq_len}, fewer than one global batch of {self.global_batch} "
                f"(batch_size {batch_size} x world_size {world_size}): use more data or smaller batches")
        self.position = 0
        self._perm_epoch, self._perm = -1, None
        self._ahead = None  # (position, x, y): the next batch, already on its way to the device

    @property
    def epoch(self) -> int:
        return self.position // self.steps_per_epoch

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:  # the same on every rank: seeded by (seed, epoch) only
            # Shuffling a uint32 arange draws exactly what rng.permutation(n) draws, in half the memory.
            self._perm = np.arange(self.num_sequences, dtype=np.uint32 if self.num_sequences < 2**32 else np.int64)
            np.random.default_rng([self.seed, epoch]).shuffle(self._perm)
            self._perm_epoch = epoch
        return self._perm

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y): int64 CPU tensors [batch_size, seq_len]; y is x shifted by one token
        (y[:, t] is the token that follows x[:, t])."""
        epoch, step = divmod(self.position, self.steps_per_epoch)
        start = step * self.global_batch + self.rank * self.batch_size
        ids = self._permutation(epoch)[start: start + self.batch_size]
        self.position += 1
        return _to_xy([_window(self.tokens, int(i), self.seq_len) for i in ids])

    def next_batch_to(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """next_batch() on `device`; the batch after it is read, pinned and its copy issued
        before this one is returned, so that on a GPU its host work and transfer overlap the
        compute already queued. `position` still counts the batches returned: the state is
        exact for resume (a prefetched batch is simply prepared again)."""
        import torch
        device = torch.device(device)
        if self._ahead is not None and self._ahead[0] == self.position:
            x, y = self._ahead[1:]
            self.position += 1
        else:
            x, y = self._send(self.next_batch(), device)
        self._ahead = (self.position, *self._send(self._peek(), device))
        return x, y

    def _peek(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.next_batch()
        self.position -= 1
        return batch

    @staticmethod
    def _send(batch, device):
        if device.type != "cuda":
            return tuple(t.to(device) for t in batch)
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in batch)

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "seq_len": self.seq_len,
                "global_batch": self.global_batch, "num_sequences": self.num_sequences}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "seq_len", "num_sequences"):
            if key in state and state[key] != getattr(self, key):
                raise DataError(f"loader state has {key}={state[key]}, this loader {getattr(self, key)}: "
                                f"resuming on different data or settings would not continue the same order")
        self._ahead = None
        old_batch = state.get("global_batch", self.global_batch)
        if old_batch == self.global_batch:
            self.position = int(state["position"])
        else:  # world size changed: continue in the same epoch after the same number of sequences
            epoch, step = divmod(int(state["position"]), max(1, self.num_sequences // old_batch))
            self.position = epoch * self.steps_per_epoch + step * old_batch // self.global_batch


def eval_batches(data: PreparedData, split: str, seq_len: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, max_batches: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first `max_batches` global batches of `split` in order (no shuffle), rank r's slice
    of each: the same validation set at every evaluation and for every world size's union."""
    tokens = data.tokens(split)
    global_batch = batch_size * world_size
    available = _num_sequences(data, split, seq_len) // global_batch
    if available == 0:
        raise DataError(f"split {split!r} of {data.path} has {data.num_tokens(split):,} tokens: fewer than one "
                        f"global batch of {global_batch} sequences of seq_len {seq_len}")
    n = available if max_batches is None else min(max_batches, available)
    out = []
    for b in range(n):
        start = b * global_batch + rank * batch_size
        out.append(_to_xy([_window(tokens, i, seq_len) for i in range(start, start + batch_size)]))
    return out
