"""Where documents come from for `lrpt data prepare`: `.txt` files (one document per
paragraph, per line or per file: `unit`), `.jsonl` files (a text field per line), `.parquet`
files and Hugging Face datasets (through `datasets`), and directories of such files. Every
source is checked before minutes of work start, undecodable text named by file and byte."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

from trainer.errors import DataError

SUFFIXES = (".txt", ".jsonl", ".parquet")
UNITS = ("paragraph", "line", "file")  # what one document of a .txt file is



def resolve_sources(sources: Iterable[str]) -> list[tuple[str, str]]:
    """Check every source up front (before minutes of work) -> [(kind, path or name)]."""
    out: list[tuple[str, str]] = []
    for src in sources:
        path = Path(src).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
            if not files:
                raise DataError(f"source directory {str(path)!r} holds no {'/'.join(SUFFIXES)} files")
            out += [(p.suffix[1:], str(p)) for p in files]
        elif path.is_file():
            if path.suffix not in SUFFIXES:
                raise DataError(f"source {str(path)!r}: unknown extension {path.suffix!r} "
                                f"(expected one of {', '.join(SUFFIXES)}, a directory or a dataset name)")
            out.append((path.suffix[1:], str(path)))
        elif path.suffix in SUFFIXES or src.startswith(("/", ".", "~")):
            raise DataError(f"source file {str(path)!r} not found")
        else:  # not on disk and not path-like: a Hugging Face dataset name such as "allenai/c4"
            out.append(("hf", src))
    if not out:
        raise DataError("no data sources given")
    return out


def _read_txt(path: str, unit: str = "paragraph", encoding: str = "utf-8") -> Iterator[str]:
    lines: list[str] = []
    with open(path, encoding=encoding) as f:
        if unit == "file":
            yield f.read()
            return
        for line in f:
            if line.strip():
                lines.append(line.rstrip("\r\n"))
                if unit == "paragraph":
                    continue
            if lines:
                yield "\n".join(lines)
                lines = []
    if lines:
        yield "\n".join(lines)


def _read_jsonl(path: str, field: str, encoding: str = "utf-8") -> Iterator[str]:
    with open(path, encoding=encoding) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                keys = list(row) if isinstance(row, dict) else type(row).__name__
                raise DataError(f"{path}:{lineno}: no string field {field!r} (has {keys}); set text_field")
            yield row[field]


def _read_datasets(kind: str, name: str, field: str, split: str, config: str | None,
                   streaming: bool | None) -> Iterator[str]:
    import datasets  # slow to import; only needed here

    try:
        if kind == "parquet":  # local files stream from disk: no Arrow cache copy
            ds = datasets.load_dataset("parquet", data_files=name, split="train",
                                       streaming=True if streaming is None else streaming)
        else:  # hub datasets are usually large: stream unless told otherwise
            ds = datasets.load_dataset(name, config, split=split,
                                       streaming=True if streaming is None else streaming)
    except Exception as e:
        what = "" if kind == "parquet" else " (it is not a local file or directory either)"
        raise DataError(f"could not load {name!r} with datasets.load_dataset{what}: {type(e).__name__}: {e}") from e
    if ds.column_names is not None and field not in ds.column_names:
        raise DataError(f"{name}: no column {field!r} (has {ds.column_names}); set text_field")
    for row in ds:
        yield row[field]


def _undecodable(path: str, encoding: str) -> str | None:
    """Why `path` is not text in `encoding` ("byte N: ..."), or None. Checked before any work:
    a binary file found an hour into tokenizing would cost the hour."""
    import codecs

    decoder, offset = codecs.getincrementaldecoder(encoding)(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            nul = chunk.find(0)
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                # e.start counts from the bytes the decoder held back plus this chunk.
                bad = offset - len(decoder.getstate()[0]) + e.start
                if nul < 0 or bad < offset + nul:
                    return f"byte {bad}: not {encoding} ({e.reason})"
            if nul >= 0:
                return f"byte {offset + nul}: a NUL byte (a binary file?)"
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as e:
            return f"byte {offset - (e.end - e.start)}: not {encoding} (the file ends inside a character)"
    return None


def check_text(sources: list[tuple[str, str]], encoding: str, skip: bool) -> tuple[list, list[str]]:
    """(the sources to read, 'path (why)' of each skipped one) for skip=True; else refuse the
    first file that does not decode, naming it and the byte."""
    try:
        import codecs
        codecs.lookup(encoding)
    except LookupError:
        raise DataError(f"encoding {encoding!r}: unknown (try utf-8, latin-1, cp1252)") from None
    keep, skipped = [], []
    for kind, name in sources:
        why = _undecodable(name, encoding) if kind in ("txt", "jsonl") else None
        if why is None:
            keep.append((kind, name))
        elif skip:
            skipped.append(f"{name} ({why})")
        else:
            raise DataError(f"{name}: {why}; pass --encoding (e.g. latin-1) if it is text in another encoding, "
                            f"or --skip-undecodable to leave such files out")
    if not keep:
        raise DataError(f"no source decodes as {encoding}: {'; '.join(skipped)}")
    return keep, skipped


def documents_of(sources: list[tuple[str, str]], text_field: str, hf_split: str, hf_config: str | None,
               streaming: bool | None, max_documents: int | None, unit: str = "paragraph",
               encoding: str = "utf-8") -> Iterator[str]:
    """Non-empty documents from all sources in order, at most `max_documents`."""
    n = 0
    for kind, name in sources:
        if kind == "txt":
            docs = _read_txt(name, unit, encoding)
        elif kind == "jsonl":
            docs = _read_jsonl(name, text_field, encoding)
        else:
            docs = _read_datasets(kind, name, text_field, hf_split, hf_config, streaming)
        for doc in docs:
            if max_documents is not None and n >= max_documents:
                return
            if doc and doc.strip():
                n += 1
                yield doc
