"""`Linear`: nn.Linear (same parameters, same state-dict names) whose forward uses `ops.linear.linear`."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.linear import linear


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
