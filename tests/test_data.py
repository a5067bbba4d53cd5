"""Preparation (txt/jsonl/parquet -> BPE -> shards), the prepared-directory reader, the
resumable sharded loader and the cached embedded corpus - on real files, no mocks."""
import json
import multiprocessing as mp

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from trainer import data
from trainer.data import corpus
from trainer.data.prepare import _is_val
from trainer.config import DataConfig

VOCAB = 320  # 256 bytes + EOS + a few merges: trains in milliseconds


@pytest.fixture(scope="module")
def docs():
    # A unique prefix per document, so the test can tell documents apart after decoding.
    return [f"Doc {i}: {text}" for i, text in enumerate(corpus.generate_documents(1200, seed=7))]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, docs):
    src = tmp_path_factory.mktemp("src") / "corpus.txt"
    src.write_text("\n\n".join(docs) + "\n")
    return data.prepare([str(src)], tmp_path_factory.mktemp("p") / "out", vocab_size=VOCAB,
                        val_fraction=0.1, seed=3, progress=False)


def split_documents(d: data.PreparedData, split: str) -> list[str]:
    ids = np.asarray(d.tokens(split)[:]).tolist()
    out, cur = [], []
    for t in ids:
        if t == d.eos_id:
            out.append(d.tokenizer.decode(cur, skip_special_tokens=False))
            cur = []
        else:
            cur.append(t)
    assert not cur  # every document ends with EOS
    return out


# ---------------------------------------------------------------------------------------------
# prepare

def test_prepare_txt_index_and_round_trip(prepared, docs):
    index = json.loads((prepared / "index.json").read_text())
    assert index["format"] == data.FORMAT_VERSION and index["dtype"] == "uint16"
    assert index["tokenizer"] == "tokenizer.json" and (prepared / "tokenizer.json").is_file()
    d = data.PreparedData(prepared)
    assert d.vocab_size == index["vocab_size"] == d.tokenizer.get_vocab_size() <= VOCAB
    assert d.eos_id == d.tokenizer.token_to_id(data.EOS)
    assert "corpus.txt" in index["source"]
    for split in ("train", "val"):
        shards = index["splits"][split]["shards"]
        assert [s["file"] for s in shards] == [f"{split}_00000.bin"]
        assert (prepared / shards[0]["file"]).stat().st_size == 2 * shards[0]["tokens"] == 2 * d.num_tokens(split)
    assert d.tokens("train")[:4].dtype == np.uint16
    train, val = split_documents(d, "train"), split_documents(d, "val")
    # Whole documents, each exactly once, decoded byte for byte; the split is the seeded hash's.
    assert sorted(train + val) == sorted(docs)
    assert 0 < len(val) < 0.25 * len(docs) and not set(train) & set(val)
    first_split = "val" if _is_val(0, 3, 0.1) else "train"
    assert split_documents(d, first_split)[0] == docs[0]
    assert d.num_documents("train") == len(train)
    assert d.minimal_pairs_path is None


def test_jsonl_parquet_and_directory_give_the_same_tokens(tmp_path, prepared, docs):
    (tmp_path / "src").mkdir()
    jsonl = tmp_path / "src" / "a.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(docs)))
    parquet = tmp_path / "b.parquet"
    pq.write_table(pa.table({"body": docs}), parquet)
    ref = data.PreparedData(prepared)
    for name, src in (("j", jsonl), ("q", parquet), ("dir", tmp_path / "src")):
        out = data.prepare([str(src)], tmp_path / name, vocab_size=VOCAB, val_fraction=0.1, seed=3,
                           text_field="body", progress=False)
        d = data.PreparedData(out)
        assert (out / "tokenizer.json").read_text() == (prepared / "tokenizer.json").read_text()
        for split in ("train", "val"):
            assert np.array_equal(d.tokens(split)[:], ref.tokens(split)[:]), (name, split)


def test_given_tokenizer_is_reused_and_max_documents(tmp_path, prepared, docs):
    src = tmp_path / "more.txt"
    src.write_text("\n\n".join(docs[:50]))
    out = data.prepare([str(src)], tmp_path / "o", tokenizer_path=str(prepared / "tokenizer.json"),
                       vocab_size=5000, max_documents=20, val_fraction=0.0, progress=False)
    assert (out / "tokenizer.json").read_bytes() == (prepared / "tokenizer.json").read_bytes()
    d = data.PreparedData(out)
    assert d.vocab_size == data.PreparedData(prepared).vocab_size
    assert split_documents(d, "train") == docs[:20] and d.num_tokens("val") == 0


def test_shards_split_a_stream_that_reads_back_whole(tmp_path, prepared, docs):
    src = tmp_path / "c.txt"
    src.write_text("\n\n".join(docs))
    out = data.prepare([str(src)], tmp_path / "o", tokenizer_path=str(prepared / "tokenizer.json"),
                       val_fraction=0.1, seed=3, shard_tokens=1000, progress=False)
    d, ref = data.PreparedData(out), data.PreparedData(prepared)
    shards = d.index["splits"]["train"]["shards"]
    assert len(shards) > 3 and all(s["tokens"] == 1000 for s in shards[:-1])
    t, r = d.tokens("train"), ref.tokens("train")
    assert len(t) == len(r) and np.array_equal(t[:], r[:])
    assert np.array_equal(t[990:2010], r[990:2010])  # crosses two shard boundaries
    assert isinstance(t[10:20], np.memmap)  # inside one shard: a view, not a copy


def test_tiny_corpus_still_gets_a_val_document(tmp_path):
    src = tmp_path / "t.txt"
    src.write_text("one document\n\nanother one\n\n\n\na third\n")
    d = data.PreparedData(data.prepare([str(src)], tmp_path / "o", vocab_size=VOCAB, progress=False,
                                       min_val_tokens=1))
    assert d.num_documents("train") == 2 and d.num_documents("val") == 1
    assert ", 1 document, " in data.describe(d.path) and ", 2 documents, " in data.describe(d.path)


VERSES = "".join(f"Verse {i}: and the word went out over the water, line by line.\n" for i in range(400))


@pytest.mark.parametrize("unit, documents", [("paragraph", 1), ("line", 400), ("file", 2)])
def test_document_unit(tmp_path, unit, documents):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text(VERSES)
    (tmp_path / "src" / "b.txt").write_text("first paragraph\nstill first\n\nsecond paragraph\n")
    out = data.prepare([str(tmp_path / "src" / "a.txt")] + ([str(tmp_path / "src" / "b.txt")] if unit == "file" else []),
                       tmp_path / "o", vocab_size=VOCAB, progress=False, unit=unit, val_fraction=0)
    d = data.PreparedData(out)
    assert d.num_documents("train") == documents
    if unit == "line":
        assert split_documents(d, "train")[:2] == VERSES.splitlines()[:2]


def test_validation_split_is_topped_up_or_refused(tmp_path):
    """One verse per line: as paragraphs it is one document, and no split can be made; as lines,
    val takes whole verses from the end until it holds one evaluation batch of tokens."""
    src = tmp_path / "verses.txt"
    src.write_text(VERSES)
    with pytest.raises(data.DataError, match=r"too little text for a validation split: .* gives 1 document\(s\).*"
                                             r"2,049 tokens .*--unit line"):
        data.prepare([str(src)], tmp_path / "o1", vocab_size=VOCAB, progress=False)
    assert not (tmp_path / "o1").exists()
    d = data.PreparedData(data.prepare([str(src)], tmp_path / "o2", vocab_size=VOCAB, progress=False, unit="line"))
    assert d.num_tokens("val") >= data.prepare.__kwdefaults__["min_val_tokens"] == 16 * 128 + 1
    assert d.num_documents("train") > d.num_documents("val") > 1 and d.index["val_topped_up"] > 0
    # The hash's own picks plus documents from the end: still whole verses, none lost or repeated.
    got = sorted(split_documents(d, "train") + split_documents(d, "val"))
    assert got == sorted(VERSES.splitlines())
    with pytest.raises(data.DataError, match="needs 100,000 tokens"):
        data.prepare([str(src)], tmp_path / "o3", vocab_size=VOCAB, progress=False, unit="line",
                     min_val_tokens=100_000)


def test_clear_errors(tmp_path, prepared):
    def fails(match, *args, **kw):
        with pytest.raises(data.DataError, match=match):
            data.prepare(*args, **{"progress": False, "vocab_size": VOCAB, **kw})

    fails("not found", [str(tmp_path / "missing.txt")], tmp_path / "o1")
    (tmp_path / "x.csv").write_text("a,b\n")
    fails("unknown extension", [str(tmp_path / "x.csv")], tmp_path / "o2")
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    fails("empty corpus", [str(tmp_path / "blank.txt")], tmp_path / "o3")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"other": 1}\n')
    fails("bad.jsonl:2: no string field 'text'", [str(tmp_path / "bad.jsonl")], tmp_path / "o4")
    (tmp_path / "ok.txt").write_text("some text\n\nmore text\n")
    fails("tokenizer file .* not found", [str(tmp_path / "ok.txt")], tmp_path / "o5",
          tokenizer_path=str(tmp_path / "nope.json"))
    fails("exists and is not empty.*overwrite=True", [str(tmp_path / "ok.txt")], prepared)
    # Nothing half-built is left behind by any of the failures above.
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == []
    out = data.prepare([str(tmp_path / "ok.txt")], tmp_path / "o6", vocab_size=VOCAB, progress=False,
                       min_val_tokens=1)
    data.prepare([str(tmp_path / "ok.txt"), str(tmp_path / "ok.txt")], out, vocab_size=VOCAB, overwrite=True,
                 progress=False, min_val_tokens=1)
    assert data.PreparedData(out).num_documents("train") + data.PreparedData(out).num_documents("val") == 4
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["o6"]


# ---------------------------------------------------------------------------------------------
# BatchLoader and eval_batches

def test_batches_are_shifted_windows(prepared):
    d = data.PreparedData(prepared)
    loader = data.BatchLoader(d, "train", seq_len=32, batch_size=4, seed=1)
    tokens = np.asarray(d.tokens("train")[:]).astype(np.int64)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    perm = np.random.default_rng([1, 0]).permutation(loader.num_sequences)
    for row, i in zip(x, perm[:4]):  # sequence i starts at token i * seq_len
        assert torch.equal(row, torch.from_numpy(tokens[i * 32: i * 32 + 32]))
    assert loader.num_sequences == (len(tokens) - 1) // 32


def test_ranks_split_the_global_batch(prepared):
    d = data.PreparedData(prepared)
    one = data.BatchLoader(d, "train", 16, batch_size=6, seed=2)
    ranks = [data.BatchLoader(d, "train", 16, batch_size=3, rank=r, world_size=2, seed=2) for r in range(2)]
    for _ in range(3):
        x, y = one.next_batch()
        parts = [loader.next_batch() for loader in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
        assert not {tuple(r) for r in parts[0][0].tolist()} & {tuple(r) for r in parts[1][0].tolist()}
    ev1 = data.eval_batches(d, "val", 16, 6, max_batches=2)
    ev2 = [data.eval_batches(d, "val", 16, 3, rank=r, world_size=2, max_batches=2) for r in range(2)]
    assert len(ev1) == 2 and ev1[0][0].shape == (6, 16)
    for b in range(2):
        assert torch.equal(torch.cat([ev2[0][b][0], ev2[1][b][0]]), ev1[b][0])
    first = np.asarray(d.tokens("val")[:17]).astype(np.int64)  # no shuffle: batch 0 row 0 is the start
    assert torch.equal(ev1[0][0][0], torch.from_numpy(first[:16]))
    assert torch.equal(ev1[0][1][0], torch.from_numpy(first[1:]))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(ev1, data.eval_batches(d, "val", 16, 6, max_batches=2)))


def test_resume_gives_the_same_batches(prepared):
    d = data.PreparedData(prepared)
    a = data.BatchLoader(d, "train", 16, 4, rank=1, world_size=2, seed=5)
    for _ in range(a.steps_per_epoch - 2):  # resume just before an epoch boundary
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # survives serialisation
    b = data.BatchLoader(d, "train", 16, 4, rank=1, world_size=2, seed=5)
    b.load_state_dict(state)
    for _ in range(5):
        assert all(torch.equal(p, q) for p, q in zip(a.next_batch(), b.next_batch()))
    assert b.epoch == 1
    with pytest.raises(data.DataError, match="seed"):
        data.BatchLoader(d, "train", 16, 4, seed=6).load_state_dict(state)


def test_epochs_wrap_with_a_new_order(prepared):
    d = data.PreparedData(prepared)
    loader = data.BatchLoader(d, "train", 64, 8, seed=0)
    n, steps = loader.num_sequences, loader.steps_per_epoch

    def epoch_rows():
        return [tuple(r) for _ in range(steps) for r in loader.next_batch()[0].tolist()]

    e0, e1 = epoch_rows(), epoch_rows()
    assert len(set(e0)) == len(e0) == steps * 8 > n - 8  # each sequence at most once, all but the remainder
    assert e0 != e1 and len(set(e0) & set(e1)) > 0.8 * len(e0)  # same sequences, another order
    assert loader.epoch == 2


def test_too_little_data_is_a_clear_error(prepared):
    d = data.PreparedData(prepared)
    with pytest.raises(data.DataError, match="fewer than one global batch"):
        data.BatchLoader(d, "val", 512, 64, world_size=2)
    with pytest.raises(data.DataError, match="fewer than one global batch"):
        data.eval_batches(d, "val", 512, 64)
    with pytest.raises(data.DataError, match="no split 'test'"):
        d.num_tokens("test")


def test_truncated_shard_is_detected(tmp_path, prepared):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    with open(copy / "train_00000.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(data.DataError, match="truncated"):
        data.PreparedData(copy).tokens("train")


# ---------------------------------------------------------------------------------------------
# resolve_dataset and the embedded corpus

SMALL = dict(embedded_sentences=1500, embedded_vocab=400)


def test_embedded_is_built_once_and_reused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LRPT_CACHE", str(tmp_path / "cache"))
    path = data.resolve_dataset(DataConfig(**SMALL))
    assert path.parent == tmp_path / "cache" and "built the embedded corpus" in capsys.readouterr().err
    stamp = (path / "index.json").stat().st_mtime_ns
    assert data.resolve_dataset(DataConfig(**SMALL)) == path
    assert (path / "index.json").stat().st_mtime_ns == stamp and capsys.readouterr().err == ""
    d = data.PreparedData(path)
    assert d.num_tokens("train") > 10000 and d.num_tokens("val") > 0
    pairs = [json.loads(line) for line in d.minimal_pairs_path.read_text().splitlines()]
    assert {p["phenomenon"] for p in pairs} == set(corpus.PHENOMENA)
    assert "minimal pairs" in data.describe(path) and "train:" in data.describe(path)
    other = data.resolve_dataset(DataConfig(embedded_sentences=1500, embedded_vocab=300))
    assert other != path  # the cache key includes the vocabulary


def test_source_path_without_index_is_a_clear_error(tmp_path, prepared):
    with pytest.raises(data.DataError, match="lrpt data prepare"):
        data.resolve_dataset(DataConfig(source=str(tmp_path)))
    assert data.resolve_dataset(DataConfig(source=str(prepared))) == prepared


def _build_in(cache: str, start, queue) -> None:
    import os
    os.environ["LRPT_CACHE"] = cache
    start.wait()  # both processes ask at the same moment
    queue.put(str(data.resolve_dataset(DataConfig(**SMALL))))


def test_concurrent_builds_end_with_one_valid_directory(tmp_path):
    ctx = mp.get_context("fork")  # fork: the children need not import torch again
    start, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_build_in, args=(str(tmp_path), start, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    paths = {queue.get(timeout=5) for _ in procs}
    assert len(paths) == 1
    built = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert [str(p) for p in built] == list(paths)  # no leftover temporary directories
    d = data.PreparedData(built[0])
    assert d.num_tokens("train") > 0 and d.minimal_pairs_path is not None
