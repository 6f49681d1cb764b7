# pyre-strict
"""Model layers shaped for optimizers that exploit parameter structure."""

import math

import torch
import torch.nn.functional as F
from torch import nn


class CombinedLinear(nn.Module):
    """A linear layer whose weight and bias live in one parameter.

    ``combined_weight`` has shape ``(out_features, in_features + 1)`` with the bias as its last
    column (``(out_features, in_features)`` without bias), so a Shampoo preconditioner sees weight
    and bias together. Initialisation and outputs equal ``nn.Linear``'s for the same values.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(
                f"CombinedLinear: in_features and out_features must be >= 1, "
                f"got {in_features} and {out_features}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.has_bias = bias
        self.combined_weight = nn.Parameter(torch.empty(out_features, in_features + int(bias)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialises like ``nn.Linear``: Kaiming-uniform weight, uniform(+-1/sqrt(in)) bias."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.combined_weight[:, : self.in_features], a=math.sqrt(5))
            if self.has_bias:
                bound = 1 / math.sqrt(self.in_features)
                nn.init.uniform_(self.combined_weight[:, self.in_features], -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.combined_weight[:, : self.in_features]
        bias = self.combined_weight[:, self.in_features] if self.has_bias else None
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}"
