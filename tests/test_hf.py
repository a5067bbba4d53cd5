"""Hugging Face round trips: our checkpoint (with LoRA adapters) -> LlamaForCausalLM gives the
same logits, and a LlamaForCausalLM checkpoint -> our Transformer gives the same logits."""
import random

import pytest
import torch

from tests.checkpoint_files import save_model
from trainer import checkpoint
from trainer.config import load_config, save_config
from trainer.data import PreparedData, prepare
from trainer.export import export_hf
from trainer.hf import model_args_from_hf
from trainer.strategies.lora import merged_state_dict
from trainer.model import Transformer, model_args
from trainer.strategies.lora import targeted_linears, wrap_linears

transformers = pytest.importorskip("transformers")

SHAPE = ["model.hidden_size=32", "model.intermediate_size=48", "model.num_layers=2", "model.num_heads=4",
         "model.num_kv_heads=2", "model.rope_theta=500", "model.norm_eps=0.00001", "data.seq_len=16"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    words = "the cat dog bird sees runs sleeps a big small red".split()
    (root / "t.txt").write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(8)) for _ in range(300)))
    return prepare([str(root / "t.txt")], root / "prepared", vocab_size=300, val_fraction=0.2, progress=False)


def randomize(model):
    """Larger-than-init weights and non-unit norms, so a wrong mapping cannot hide in noise."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if p.dim() == 1 else torch.randn_like(p) * 0.2)


def test_merged_state_dict_folds_the_scale():
    sd = {"x.weight": torch.ones(2, 3), "x.lora_A": torch.ones(1, 3), "x.lora_B": torch.full((2, 1), 2.0),
          "x.lora_scale": torch.tensor(0.25), "norm.weight": torch.ones(3)}
    merged = merged_state_dict(sd)
    assert set(merged) == {"x.weight", "norm.weight"}
    torch.testing.assert_close(merged["x.weight"], torch.full((2, 3), 1.5))


def test_export_with_adapters_loads_in_transformers_with_equal_logits(tmp_path, data_dir):
    data = PreparedData(data_dir)
    cfg = load_config(None, SHAPE)
    run = tmp_path / "run"
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    model = Transformer(model_args(cfg.model, cfg.data.seq_len, data.vocab_size))
    randomize(model)
    # A rank and a scale per module, as hybrid and adaptive rank leave them.
    ranks = {path: {"q": 4, "v": 2, "down": 6}[t] for path, t in targeted_linears(model, ["q", "v", "down"])}
    wrap_linears(model, ranks, scale=lambda r: 1.0 / r, dropout=0.0)
    with torch.no_grad():  # non-zero adapters: the export must fold them in, scale included
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    save_model(run / "checkpoints", 7, model.state_dict(), keep=2)

    out = export_hf(run, tmp_path / "hf", data_dir=data_dir)
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()}
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.config.num_key_value_heads == 2 and hf.config.eos_token_id == data.eos_id
    ids = torch.randint(0, data.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model.eval()(ids), atol=1e-4, rtol=1e-4)

    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "the big cat sees a small red bird"
    assert tok.encode(text, add_special_tokens=False) == data.tokenizer.encode(text).ids
    assert tok.eos_token_id == data.eos_id


@pytest.mark.parametrize("fmt,tied", [("safetensors", False), ("bin", True)])
def test_transformers_checkpoint_loads_into_our_model(tmp_path, fmt, tied):
    config = transformers.LlamaConfig(vocab_size=70, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rope_theta=500.0, rms_norm_eps=1e-5, tie_word_embeddings=tied)
    torch.manual_seed(1)
    hf = transformers.LlamaForCausalLM(config).eval()
    randomize(hf)
    if fmt == "safetensors":
        hf.save_pretrained(tmp_path)
    else:  # the older format, as many checkpoints on disk still are
        config.save_pretrained(tmp_path)
        sd = {k: v for k, v in hf.state_dict().items() if not (tied and k == "lm_head.weight")}
        torch.save(sd, tmp_path / "pytorch_model.bin")

    args, state = checkpoint.initial_weights(tmp_path, 32)  # what model.init_from reads
    assert (args.num_kv_heads, args.rope_theta, args.norm_eps, args.max_seq_len) == (2, 500.0, 1e-5, 32)
    ours = Transformer(args)
    ours.load_state_dict(state)
    ids = torch.randint(0, 70, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_import_refuses_what_our_model_cannot_compute(tmp_path):
    transformers.LlamaConfig(hidden_size=32, num_attention_heads=4, attention_bias=True).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="bias"):
        model_args_from_hf(tmp_path)
