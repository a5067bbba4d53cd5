"""Hugging Face Llama conversion: a model to a Llama directory (export), and a Llama directory
to our shape and weights (import, to continue pretraining from). Format only: reading our own
checkpoints is trainer/checkpoint's job (trainer/export.py joins the two).

Our module names are Hugging Face Llama's minus the `model.` prefix and our RoPE uses the
same rotate-half layout, so conversion is a rename: no weight is permuted.
"""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import torch

from trainer.errors import refused_pickle
from trainer.shapes import ModelArgs

# ---------------------------------------------------------------------------------------------
# Export

def hf_config(args: ModelArgs, eos_id: int | None) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": args.vocab_size,
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.num_layers,
        "num_attention_heads": args.num_heads,
        "num_key_value_heads": args.num_kv_heads,
        "head_dim": args.head_dim,
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        # transformers < 5 reads rope_theta; 5.x reads rope_parameters. Both say the same.
        "rope_theta": args.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "hidden_act": "silu",
        "initializer_range": args.init_std,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "torch_dtype": "float32",
        "dtype": "float32",
        # Documents are joined by EOS in training, so EOS is also the start-of-text context.
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
    }


def write_hf(model, out_dir: str | Path, data=None) -> Path:
    """Write `model` (a plain Transformer, adapters merged) as a Hugging Face Llama directory
    loadable offline by AutoModelForCausalLM, with `data`'s tokenizer (a PreparedData) if given."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {_to_hf_name(k): v.detach().float().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(model.args, data.eos_id if data else None), indent=2))
    # safetensors writes through a private temp file (0600); the others follow the umask.
    shutil.copymode(out / "config.json", out / "model.safetensors")
    if data is not None:
        shutil.copyfile(data.path / data.index["tokenizer"], out / "tokenizer.json")
        eos = data.index["eos_token"]
        (out / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": eos, "eos_token": eos, "pad_token": eos,
            "model_max_length": model.args.max_seq_len,
            "clean_up_tokenization_spaces": False,
        }, indent=2))
    return out


def _to_hf_name(key: str) -> str:
    return key if key.startswith("lm_head.") else f"model.{key}"


# ---------------------------------------------------------------------------------------------
# Import: start training from a Hugging Face Llama checkpoint

def is_hf_dir(path: str | Path) -> bool:
    return Path(path, "config.json").is_file()


def model_args_from_hf(hf_dir: str | Path, max_seq_len: int | None = None) -> ModelArgs:
    """ModelArgs from a Llama config.json. `max_seq_len` replaces max_position_embeddings,
    whose RoPE table can be needlessly long (131072 for Llama 3)."""
    c = json.loads(Path(hf_dir, "config.json").read_text())
    heads = c["num_attention_heads"]

    def require(ok, what):
        if not ok:
            raise ValueError(f"{hf_dir}: {what} is not supported by trainer.model")

    require(c.get("model_type") == "llama", f"model_type={c.get('model_type')!r}")
    require(c.get("hidden_act", "silu") == "silu", f"hidden_act={c.get('hidden_act')!r}")
    require(not c.get("attention_bias") and not c.get("mlp_bias"), "bias in attention or MLP")
    require(c.get("head_dim") in (None, c["hidden_size"] // heads), f"head_dim={c.get('head_dim')}")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    require(rope.get("rope_type", rope.get("type", "default")) == "default", f"RoPE scaling {rope}")
    return ModelArgs(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_layers=c["num_hidden_layers"], num_heads=heads, num_kv_heads=c.get("num_key_value_heads") or heads,
        max_seq_len=max_seq_len or c.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
        norm_eps=float(c.get("rms_norm_eps", 1e-6)), init_std=float(c.get("initializer_range", 0.02)))


def read_hf_state_dict(hf_dir: str | Path) -> dict:
    """Tensors of a Hugging Face checkpoint (safetensors or pytorch_model.bin, sharded or not),
    renamed to our module names."""
    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    files = sorted(hf_dir.glob("*.safetensors"))
    raw: dict = {}
    if files:
        for f in files:
            raw.update(load_file(str(f)))
    else:
        files = sorted(hf_dir.glob("pytorch_model*.bin"))
        if not files:
            raise FileNotFoundError(f"{hf_dir}: no *.safetensors or pytorch_model*.bin")
        for f in files:
            try:  # tensors only: a pickle naming anything else is refused, never run
                raw.update(torch.load(f, map_location="cpu", weights_only=True))
            except pickle.UnpicklingError as e:
                raise refused_pickle(f, e) from None
    sd = {k.removeprefix("model."): v for k, v in raw.items() if "rotary_emb" not in k}
    if "lm_head.weight" not in sd:  # a tied checkpoint: our head is untied, so it starts as a copy
        sd["lm_head.weight"] = sd["embed_tokens.weight"].clone()
    return sd
