"""LLaMA decoder: RMSNorm, rotary embeddings, SwiGLU MLP, causal SDPA attention, untied
embeddings and head.

Module names follow Hugging Face's LlamaForCausalLM (`embed_tokens`, `self_attn.q_proj`, ...)
so that export and import are a prefix away, and RoPE uses its rotate-half layout so that
logits match without permuting weights.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from trainer.shapes import ModelArgs, model_args


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 as LLaMA does: bf16 variance loses too much precision.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_tables(args: ModelArgs, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2, device=device).float() / args.head_dim))
    t = torch.arange(args.max_seq_len, device=device).float()
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)  # rotate-half layout, as Hugging Face Llama
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.hidden_size, args.num_heads * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.num_heads * args.head_dim, args.hidden_size, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(torch.autograd.Function):
    """silu(gate) * up, keeping only gate and up for backward. Autograd would also keep
    silu(gate), one [tokens, intermediate] tensor per layer (89 MiB at 1B widths and 4096
    tokens); recomputing it in backward is one element-wise pass. The gradients are the ops
    autograd runs (mul, silu_backward), so they are bitwise the same."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(SwiGLU.apply(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        # Recompute each block in backward instead of keeping its activations (the trainer
        # sets it from train.activation_checkpointing).
        self.activation_checkpointing = False
        cos, sin = rope_tables(args)
        # Not persistent: recomputed from the config, so checkpoints hold only learned weights.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.args.init_std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Logits for `idx` [B, T]; with `targets`, the mean cross-entropy instead."""
        T = idx.shape[1]
        if T > self.args.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds the model's max_seq_len {self.args.max_seq_len}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.embed_tokens(idx)
        for layer in self.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                # Non-reentrant: works with parameters only some of which train, and replays
                # the RNG state so dropout masks match in the recomputation.
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        logits = self.lm_head(self.norm(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Model FLOPs per token for forward+backward: 6N for the matmuls with weights plus
        12*L*d*T for attention scores and values (PaLM appendix B), as REFERENCE.md's MFU."""
        n = sum(p.numel() for n_, p in self.named_parameters() if "embed_tokens" not in n_)
        return 6 * n + 12 * self.args.num_layers * self.args.hidden_size * seq_len


def count_params(args: ModelArgs) -> int:
    """Parameter count without allocating (meta device): used to print sizes up to 7B."""
    with torch.device("meta"):
        return Transformer(args).num_params()


def humanize(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def configure_optimizer_groups(named_params, weight_decay: float) -> list[dict]:
    """Weight decay on 2-D matrices only (not norms, not vectors), as nanoGPT and LLaMA."""
    decay, no_decay = [], []
    for _, p in named_params:
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]




def build_model(cfg, tokenizer_vocab: int, init=None) -> tuple[ModelArgs, Transformer]:
    """The shape and the module a run's config asks for: a named size with the tokenizer's
    vocabulary, or `init`'s (ModelArgs, state dict): the weights to continue pretraining from
    (model.init_from, read by trainer/checkpoint). Initial weights come from the global
    generator: seed it first."""
    from trainer.errors import ConfigError

    args = init[0] if init is not None else model_args(cfg.model, cfg.data.seq_len, tokenizer_vocab)
    if args.vocab_size < tokenizer_vocab:
        raise ConfigError(f"model.vocab_size={args.vocab_size}: expected at least the tokenizer's "
                          f"vocabulary ({tokenizer_vocab}), or 0 to take it from the tokenizer")
    module = Transformer(args)
    if init is not None:
        missing, unexpected = module.load_state_dict(init[1], strict=False)
        if missing or unexpected:
            raise ConfigError(f"model.init_from={cfg.model.init_from}: its weights do not fit the model; "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return args, module
