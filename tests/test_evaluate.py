"""Perplexity and the minimal-pair scorer on models whose answers we control."""
import json
import math
import random

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from tests.checkpoint_files import save_model
from trainer.config import load_config, save_config
from trainer.data import PreparedData, eval_batches, prepare
from trainer.evaluate import (evaluate_checkpoint, load_minimal_pairs, minimal_pair_accuracy, validation_loss,
                              sequence_logprob)
from trainer.model import ModelArgs, Transformer, model_args
from trainer.strategies.lora import wrap_linears

SUBJECTS = {"sg": ["the cat", "the dog", "a bird", "the child"], "pl": ["the cats", "the dogs", "some birds", "the children"]}
VERBS = {"sg": ["runs", "sleeps", "sings", "eats"], "pl": ["run", "sleep", "sing", "eat"]}


def good_sentence(rng, number):
    return f"{rng.choice(SUBJECTS[number])} {rng.choice(VERBS[number])} ."


def make_tokenizer():
    words = sorted({w for group in (*SUBJECTS.values(), *VERBS.values()) for s in group for w in s.split()} | {"."})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<eos>", *words])}, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def make_pairs():
    pairs = []
    for number, other in (("sg", "pl"), ("pl", "sg")):
        for subject in SUBJECTS[number]:
            for good, bad in zip(VERBS[number], VERBS[other]):
                pairs.append({"sentence_good": f"{subject} {good} .", "sentence_bad": f"{subject} {bad} .",
                              "phenomenon": f"agreement_{number}"})
    return pairs


def tiny_model(vocab):
    torch.manual_seed(0)
    return Transformer(ModelArgs(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                                 num_kv_heads=2, max_seq_len=32))


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    model = tiny_model(50)
    torch.nn.init.zeros_(model.lm_head.weight)  # all logits 0: every token has probability 1/50
    batches = [(torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (2, 8))) for _ in range(3)]
    loss, ppl = validation_loss(model, batches, "cpu").values()
    assert loss == pytest.approx(math.log(50), rel=1e-6) and ppl == pytest.approx(50, rel=1e-5)
    assert model.training  # mode restored


def test_batched_scores_equal_one_at_a_time_scores():
    model = tiny_model(20).eval()
    seqs = [[3, 4, 5], [7], [1, 2, 3, 4, 5, 6, 7], []]
    batched = sequence_logprob(model, seqs, bos_id=0, device="cpu", batch_size=3)
    for s, got in zip(seqs, batched):
        inp = torch.tensor([[0, *s]])
        with torch.no_grad():
            logp = torch.log_softmax(model(inp)[0, :-1], -1)
        want = float(logp[range(len(s)), inp[0, 1:]].sum())
        assert got == pytest.approx(want, abs=1e-4)


def test_training_on_good_sentences_makes_the_scorer_prefer_them():
    tok, pairs = make_tokenizer(), make_pairs()
    model = tiny_model(tok.get_vocab_size())
    before = minimal_pair_accuracy(model, tok, pairs, bos_id=0, device="cpu")
    rng = random.Random(0)
    stream = []
    for _ in range(2000):  # documents joined by EOS, as trainer.data packs them
        stream += [0, *tok.encode(good_sentence(rng, rng.choice(["sg", "pl"]))).ids]
    data = torch.tensor(stream)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(40):  # 30 already suffices for seeds 0-2
        starts = torch.randint(0, len(data) - 17, (16,))
        x = torch.stack([data[s:s + 16] for s in starts])
        y = torch.stack([data[s + 1:s + 17] for s in starts])
        model(x, y).backward()
        opt.step()
        opt.zero_grad()
    after = minimal_pair_accuracy(model, tok, pairs, bos_id=0, device="cpu", batch_size=8)
    assert set(after) == {"overall", "agreement_sg", "agreement_pl"}
    assert after["overall"] == 1.0 > before["overall"]


def test_load_minimal_pairs_from_a_file_and_a_blimp_directory(tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_text("\n".join(json.dumps(p) for p in make_pairs()) + "\n")
    assert load_minimal_pairs(f) == make_pairs()
    blimp = tmp_path / "blimp"
    blimp.mkdir()
    row = {"sentence_good": "a b", "sentence_bad": "b a", "UID": "adjunct_island", "linguistics_term": "island_effects"}
    (blimp / "adjunct_island.jsonl").write_text(json.dumps(row) + "\n")
    (blimp / "my_phenomenon.jsonl").write_text(json.dumps({"sentence_good": "x", "sentence_bad": "y"}) + "\n\n")
    got = load_minimal_pairs(blimp)
    assert [p["phenomenon"] for p in got] == ["island_effects", "my_phenomenon"]
    assert got[0]["uid"] == "adjunct_island"


def test_evaluate_checkpoint_merges_adapters_and_reports_metrics_keys(tmp_path):
    rng = random.Random(0)
    text = "\n\n".join(good_sentence(rng, rng.choice(["sg", "pl"])) for _ in range(300))
    (tmp_path / "t.txt").write_text(text)
    data = PreparedData(prepare([str(tmp_path / "t.txt")], tmp_path / "data", vocab_size=300, val_fraction=0.2, min_val_tokens=0,
                                progress=False))
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in make_pairs()))
    cfg = load_config(None, ["model.hidden_size=32", "model.intermediate_size=48", "model.num_layers=1",
                             "model.num_heads=2", "data.seq_len=16", "data.batch_size=4", "logging.eval_batches=3"])
    run = tmp_path / "run"
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    torch.manual_seed(0)
    model = Transformer(model_args(cfg.model, 16, data.vocab_size))
    # Ranks and scales per module, as hybrid and adaptive rank leave them.
    wrap_linears(model, {"layers.0.self_attn.v_proj": 2, "layers.0.mlp.down_proj": 3}, scale=lambda r: 4.0 / r,
                 dropout=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    save_model(run / "checkpoints", 3, model.state_dict(), keep=2)

    got = evaluate_checkpoint(run, data_dir=data.path, pairs=tmp_path / "pairs.jsonl")
    loss, ppl = validation_loss(model, eval_batches(data, "val", 16, 4, 0, 1, 3), "cpu").values()
    assert got["step"] == 3
    assert got["val_loss"] == pytest.approx(loss, rel=1e-5) and got["val_ppl"] == pytest.approx(ppl, rel=1e-5)
    want = minimal_pair_accuracy(model, data.tokenizer, make_pairs(), data.eos_id, "cpu")
    assert got["blimp_acc"] == want["overall"] and got["blimp/agreement_sg"] == want["agreement_sg"]
