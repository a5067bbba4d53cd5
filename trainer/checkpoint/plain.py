"""State objects as JSON plus tensors: how a checkpoint stores what is not a model or optimizer
tensor (the step counters, the loader position, a strategy's pools, each rank's RNG and PowerSGD
state) without pickle, so that loading it runs no code.

`split(obj, prefix)` gives a JSON-able skeleton and {key: tensor}; the skeleton names each
tensor by its key (written through DCP) and `join(skeleton, tensors)` rebuilds the object.
Plain types pass through; tuples, dicts with non-string keys, numpy arrays and numpy's
RandomState (PowerSGD holds one) get a tagged form. Anything else is refused by name, so a new
kind of state cannot slip into a checkpoint unreadable.
"""
from __future__ import annotations

import numpy as np
import torch

_TAGS = ("__tensor__", "__tuple__", "__dict__", "__ndarray__", "__randomstate__")


def split(obj, prefix: str) -> tuple[object, dict[str, torch.Tensor]]:
    tensors: dict[str, torch.Tensor] = {}

    def go(x, path: str):
        if torch.is_tensor(x):
            if path in tensors:
                raise ValueError(f"two tensors of a checkpoint's state are both named {path!r}")
            tensors[path] = x.detach()
            return {"__tensor__": path, "shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")}
        if x is None or isinstance(x, (bool, str)):
            return x
        if isinstance(x, (int, float, np.integer, np.floating, np.bool_)):
            return x.item() if isinstance(x, np.generic) else x
        if isinstance(x, dict):
            if all(isinstance(k, str) and k not in _TAGS for k in x):
                return {k: go(v, f"{path}/{k}") for k, v in x.items()}
            return {"__dict__": [[go(k, f"{path}/key{i}"), go(v, f"{path}/{k}")] for i, (k, v) in enumerate(x.items())]}
        if isinstance(x, list):
            return [go(v, f"{path}/{i}") for i, v in enumerate(x)]
        if isinstance(x, tuple):
            return {"__tuple__": [go(v, f"{path}/{i}") for i, v in enumerate(x)]}
        if isinstance(x, np.ndarray):
            return {"__ndarray__": x.tolist(), "dtype": x.dtype.str}
        if isinstance(x, np.random.RandomState):
            return {"__randomstate__": go(x.get_state(), path)}
        raise TypeError(f"checkpoint state {path!r} is a {type(x).__name__}: only tensors, numbers, strings, "
                        f"lists, tuples, dicts and numpy arrays can be saved")

    return go(obj, prefix), tensors


def tensor_specs(skeleton) -> dict[str, tuple[list[int], torch.dtype]]:
    """{key: (shape, dtype)} of every tensor a skeleton names."""
    out = {}

    def go(x):
        if isinstance(x, dict):
            if "__tensor__" in x:
                out[x["__tensor__"]] = (list(x["shape"]), getattr(torch, x["dtype"]))
                return
            for v in x.values():
                go(v)
        elif isinstance(x, list):
            for v in x:
                go(v)

    go(skeleton)
    for key, (_, dtype) in out.items():
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"checkpoint tensor {key!r} has no valid dtype")
    return out


def join(skeleton, tensors: dict[str, torch.Tensor]):
    def go(x):
        if isinstance(x, list):
            return [go(v) for v in x]
        if not isinstance(x, dict):
            return x
        if "__tensor__" in x:
            return tensors[x["__tensor__"]].view(x["shape"])
        if "__tuple__" in x:
            return tuple(go(v) for v in x["__tuple__"])
        if "__dict__" in x:
            return {go(k): go(v) for k, v in x["__dict__"]}
        if "__ndarray__" in x:
            return np.array(x["__ndarray__"], dtype=np.dtype(x["dtype"]))
        if "__randomstate__" in x:
            rs = np.random.RandomState()
            rs.set_state(go(x["__randomstate__"]))
            return rs
        return {k: go(v) for k, v in x.items()}

    return go(skeleton)
