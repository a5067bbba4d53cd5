"""Datasets: `prepare` builds a prepared directory from text (prepare.py; the generated default
in embedded.py and corpus.py), and loader.py reads one every step."""
from trainer.data.embedded import cache_dir, embedded_dataset
from trainer.data.loader import BatchLoader, PreparedData, TokenStream, describe, eval_batches, resolve_dataset
from trainer.data.prepare import EOS, FORMAT_VERSION, load_tokenizer, prepare, train_tokenizer
from trainer.errors import DataError

__all__ = ["BatchLoader", "DataError", "EOS", "FORMAT_VERSION", "PreparedData", "TokenStream", "cache_dir",
           "describe", "embedded_dataset", "eval_batches", "load_tokenizer", "prepare", "resolve_dataset",
           "train_tokenizer"]
