"""Strategy registry: the loop looks strategies up by `strategy.name` and knows none of them."""
STRATEGIES = {"full": "trainer.strategies.full:FullRank",
              "lora": "trainer.strategies.lora:LoRA",
              "relora": "trainer.strategies.relora:ReLoRA",
              "switchlora": "trainer.strategies.switchlora:SwitchLoRA"}


def build_strategy(cfg, seed: int):
    import importlib

    module, cls = STRATEGIES[cfg.name].split(":")
    return getattr(importlib.import_module(module), cls)(cfg, seed)
