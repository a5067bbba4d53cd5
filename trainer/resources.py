"""The non-Python files the package ships (configs/, slurm/): from the checkout when running
in one (or from an editable install), else from the copy a `pip install .` put under
<prefix>/share/lowrank-pretrain (pyproject.toml's data-files). Torch-free: the launcher uses it.
"""
from __future__ import annotations

import site
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
SHARE = Path("share", "lowrank-pretrain")


def resource(*parts: str) -> Path:
    """The shipped file or directory at `parts` (e.g. "configs", "deepspeed", "zero2.json")."""
    roots = [CHECKOUT, Path(sys.prefix) / SHARE, Path(site.getuserbase()) / SHARE]
    for root in roots:
        path = root.joinpath(*parts)
        if path.exists():
            return path
    raise FileNotFoundError(f"{Path(*parts)} is in none of {', '.join(map(str, roots))}: "
                            f"reinstall lowrank-pretrain (`pip install .` from its checkout)")
