"""Token-level perplexity on disjoint windows — the GPTQ/AWQ papers' protocol.

Text is tokenized once, cut into disjoint windows of `seqlen` tokens with the tail dropped, and
every token of a window except its first is predicted from the tokens before it in that window;
perplexity = exp(mean negative log-likelihood over all predicted tokens).
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def window_nll(model, ids: torch.Tensor, seqlen: int, batch_size: int = 8, device=None) -> tuple[float, int]:
    """Sum of token NLLs and the number of predicted tokens over disjoint windows."""
    ids = ids.flatten()
    n = ids.numel() // seqlen
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    windows = ids[: n * seqlen].view(n, seqlen)
    device = device or next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, n, batch_size):
        batch = windows[i : i + batch_size].to(device)
        logits = model(input_ids=batch).logits.float()
        lp = torch.log_softmax(logits[:, :-1], dim=-1)
        nll = -lp.gather(-1, batch[:, 1:, None]).squeeze(-1)
        total += nll.double().sum().item()
        count += nll.numel()
    return total, count


def perplexity(model, ids: torch.Tensor, seqlen: int, batch_size: int = 8, device=None) -> float:
    total, count = window_nll(model, ids, seqlen, batch_size, device)
    return math.exp(total / count)
