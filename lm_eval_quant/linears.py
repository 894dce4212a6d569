"""What a quantizable linear is, and its weight as [out, in]: the one definition (issue 10).

An ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2's, which stores its weight as [in, out]).
Below ``methods`` and ``accounting`` (both import it; it imports neither).
"""

from __future__ import annotations

import torch
from torch import nn


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D

        return Conv1D
    except ImportError:  # pragma: no cover  (transformers without Conv1D)
        return None


def is_quantizable(module: nn.Module) -> bool:
    c1d = _conv1d_type()
    return isinstance(module, nn.Linear) or (c1d is not None and isinstance(module, c1d))


def is_conv1d(module: nn.Module) -> bool:
    c1d = _conv1d_type()
    return c1d is not None and isinstance(module, c1d)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as [out, in] (Conv1D stores [in, out])."""
    w = module.weight.data
    return w.t() if is_conv1d(module) else w
