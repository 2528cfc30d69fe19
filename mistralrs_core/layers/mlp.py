"""Feed-forward blocks."""
from __future__ import annotations

import torch
from torch import nn

from mistralrs_core.layers.activations import get_activation
from mistralrs_core.layers.linear import Linear, fuse_linears


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)); ``fused=True`` reads one ``gate_up_proj`` weight (Phi-3 style)."""

    def __init__(self, hidden: int, intermediate: int, act: str = "silu", bias: bool = False,
                 fused: bool = False):
        super().__init__()
        self.fused = fused
        if fused:
            self.gate_up_proj = Linear(hidden, 2 * intermediate, bias)
        else:
            self.gate_proj = Linear(hidden, intermediate, bias)
            self.up_proj = Linear(hidden, intermediate, bias)
        self.down_proj = Linear(intermediate, hidden, bias)
        self.act = get_activation(act)

    def post_load(self) -> None:
        """Run gate and up as one matmul when their storage allows."""
        if self.fused or type(self).forward is not GatedMLP.forward:
            return
        fused = fuse_linears([self.gate_proj, self.up_proj])
        if fused is not None:
            self.gate_up_proj = fused
            self.fused = True
            del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.act(gate) * up)


class PlainMLP(nn.Module):
    """fc2(act(fc1(x))) with configurable module names (GPT-2/Phi-2/Starcoder2 style)."""

    def __init__(self, hidden: int, intermediate: int, act: str, bias: bool = True,
                 names: tuple[str, str] = ("fc1", "fc2")):
        super().__init__()
        self._names = names
        setattr(self, names[0], Linear(hidden, intermediate, bias))
        setattr(self, names[1], Linear(intermediate, hidden, bias))
        self.act = get_activation(act)

    def forward(self, x):
        up, down = (getattr(self, n) for n in self._names)
        return down(self.act(up(x)))
