"""Model shapes without torch: the named sizes, the resolved shape of a model, and the names
of the projections a low-rank strategy can wrap. Config validation reads these, so
`import trainer.config` stays free of torch.
"""
from __future__ import annotations

from dataclasses import dataclass

# Named sizes. vocab_size is left to the tokenizer at train time; the LLaMA shapes are the
# GaLore/ReLoRA table's (REFERENCE.md), pico-* are pico-decoder tiny/small (GQA, 4 KV heads).
SIZES: dict[str, dict] = {
    "micro": dict(hidden_size=128, intermediate_size=352, num_layers=4, num_heads=4),
    "pico-tiny": dict(hidden_size=96, intermediate_size=384, num_layers=12, num_heads=12, num_kv_heads=4,
                      vocab_size=50304),
    "pico-small": dict(hidden_size=384, intermediate_size=1536, num_layers=12, num_heads=12, num_kv_heads=4,
                       vocab_size=50304),
    "llama-60m": dict(hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8, vocab_size=32000),
    "llama-130m": dict(hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12, vocab_size=32000),
    "llama-350m": dict(hidden_size=1024, intermediate_size=2736, num_layers=24, num_heads=16, vocab_size=32000),
    "llama-1b": dict(hidden_size=2048, intermediate_size=5461, num_layers=24, num_heads=32, vocab_size=32000),
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, vocab_size=32000),
}

# Short name (as in `strategy.targets`) -> module path inside a decoder layer (Hugging Face
# Llama naming, which trainer.model keeps so that export is a prefix away).
PROJECTIONS: dict[str, str] = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
}


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def model_args(cfg, seq_len: int, vocab_size: int = 0) -> ModelArgs:
    """Resolve a ModelConfig: named size, then explicit fields; vocab from the argument
    (the tokenizer's) unless the config names one."""
    size = SIZES[cfg.name]

    def pick(key, fallback=None):
        return getattr(cfg, key) or size.get(key, fallback)

    heads = pick("num_heads")
    return ModelArgs(
        vocab_size=cfg.vocab_size or vocab_size or size.get("vocab_size", 0),
        hidden_size=pick("hidden_size"),
        intermediate_size=pick("intermediate_size"),
        num_layers=pick("num_layers"),
        num_heads=heads,
        num_kv_heads=cfg.num_kv_heads or (size.get("num_kv_heads", heads) if not cfg.num_heads else heads),
        max_seq_len=max(cfg.max_seq_len, seq_len),
        rope_theta=cfg.rope_theta,
        norm_eps=cfg.norm_eps,
        init_std=cfg.init_std,
    )
