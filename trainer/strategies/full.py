"""Full-rank training: the baseline every low-rank strategy is measured against."""
from trainer.strategies.base import Strategy


class FullRank(Strategy):
    name = "full"
