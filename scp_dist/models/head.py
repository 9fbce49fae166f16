"""The trainable clustering head g: the paper's five-layer MLP D->1024->786->512->1024->K.

Several heads (different seeds) can be trained in one pass: weights are stored stacked as
(H, in, out) and applied with batched matmuls, so H heads cost one wide computation instead of a
Python loop. With H=1 this is exactly an MLP of nn.Linear layers (same init, same math).
The paper does not name the activation; we use ReLU between layers (configurable) and no
activation after the last layer; softmax is applied by the loss (on logits, for stability).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


class SCPHead(nn.Module):
    def __init__(
        self,
        in_dim: int,
        hidden: list[int] | tuple[int, ...],
        num_clusters: int,
        num_heads: int = 1,
        activation: str = "relu",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if num_clusters < 2:
            raise ValueError(f"num_clusters (K) must be >= 2, got {num_clusters}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        self.dims = [int(in_dim), *map(int, hidden), int(num_clusters)]
        self.num_heads = int(num_heads)
        self.activation = activation
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for d_in, d_out in zip(self.dims[:-1], self.dims[1:], strict=True):
            self.weights.append(nn.Parameter(torch.empty(self.num_heads, d_in, d_out)))
            self.biases.append(nn.Parameter(torch.empty(self.num_heads, 1, d_out)))
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        # nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)); head h is seeded with seed+h so
        # a head's init does not depend on how many heads share the pass.
        for h in range(self.num_heads):
            g = torch.Generator().manual_seed(seed + h)
            for w, b in zip(self.weights, self.biases, strict=True):
                bound = 1.0 / math.sqrt(w.shape[1])
                w[h].copy_(torch.empty(w.shape[1:]).uniform_(-bound, bound, generator=g))
                b[h].copy_(torch.empty(b.shape[1:]).uniform_(-bound, bound, generator=g))

    @property
    def num_clusters(self) -> int:
        return self.dims[-1]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) features -> (H, N, K) logits."""
        act = _ACTIVATIONS[self.activation]
        x = features.unsqueeze(0).expand(self.num_heads, -1, -1)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            x = torch.baddbmm(b, x, w)
            if i < last:
                x = act(x)
        return x

    def extra_repr(self) -> str:
        return f"dims={self.dims}, heads={self.num_heads}, activation={self.activation}"
