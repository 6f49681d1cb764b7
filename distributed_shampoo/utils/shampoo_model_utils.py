# pyre-strict
"""Model layers shaped for optimizers that exploit parameter structure."""

import math

import torch
import torch.nn.functional as F
from torch import nn


class CombinedLinear(nn.Module):
    """A linear layer whose weight and bias live in one parameter (the reference's layer).

    ``combined_weight`` has shape ``(out_features, in_features_with_bias)``: the weight, and the
    bias as its last column when ``bias`` is true (``in_features_with_bias = in_features + 1``),
    so a Shampoo preconditioner sees weight and bias together. Initialisation, outputs and
    gradients equal ``nn.Linear``'s for the same values.

    Args:
        in_features: Size of each input sample (>= 1).
        out_features: Size of each output sample (>= 1).
        bias: Learn an additive bias (kept in ``combined_weight``); the attribute ``bias`` is this
            flag, as in the reference.
        device, dtype: Of ``combined_weight``.

    Raises:
        ValueError: ``in_features`` or ``out_features`` < 1.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(
                f"CombinedLinear: in_features and out_features must be >= 1, "
                f"got {in_features} and {out_features}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.in_features_with_bias: int = in_features + int(bias)
        self.bias = bias
        self.combined_weight = nn.Parameter(
            torch.empty(out_features, self.in_features_with_bias, device=device, dtype=dtype)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialises like ``nn.Linear``: Kaiming-uniform weight, uniform(+-1/sqrt(in)) bias."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.combined_weight[:, : self.in_features], a=math.sqrt(5))
            if self.bias:
                bound = 1 / math.sqrt(self.in_features)
                nn.init.uniform_(self.combined_weight[:, self.in_features], -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.combined_weight[:, : self.in_features]
        bias = self.combined_weight[:, self.in_features] if self.bias else None
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        """The reference's form, e.g. ``self.in_features=10, self.out_features=20, self.in_features_with_bias=11``."""
        return f"{self.in_features=}, {self.out_features=}, {self.in_features_with_bias=}"
