"""STEGO's trained head and its channel dropout (docs/stego.md §2). Pure tensor code, no I/O.

The three dropout masks of a training forward pass are drawn from a caller-owned `torch.Generator`, in this order:

1. the input of the linear branch `L1`,
2. the input of the nonlinear branch `L3(relu(L2(.)))`,
3. the features handed to the loss (`f_loss`).

That is the order in which the reference's `DinoFeaturizer.forward` happens to draw them; since the three masks are
independent and identically distributed, any order gives the same training distribution. Fixing it (and drawing only
from the generator) is what makes a resumed run bit-for-bit equal to an uninterrupted one.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def channel_dropout(x: Tensor, p: float, generator: torch.Generator) -> Tensor:
    """Dropout2d on (B, C, h, w): each (image, channel) plane is zeroed with probability `p`, the kept ones are
    scaled by 1/(1-p). The mask comes from `generator` (one uniform number per plane, B-major), never from the
    global RNG, so that training can be replayed exactly."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    if p == 0.0:
        return x
    if p == 1.0:
        return torch.zeros_like(x)
    u = torch.rand(x.shape[0], x.shape[1], 1, 1, generator=generator, device=generator.device)
    keep = (u >= p).to(device=x.device, dtype=x.dtype)  # P(keep) = 1 - p exactly, u in [0, 1)
    # the scale goes on the (B, C, 1, 1) mask, not on x: one pass over x instead of two, and the same numbers, since
    # x·1·s = x·s and x·0·s = x·0 exactly
    return x * (keep * (1.0 / (1.0 - p)))


class StegoHead(nn.Module):
    """The segmentation head `c = L1(drop_a(f)) + L3(relu(L2(drop_b(f))))` (docs/stego.md §2), 1x1 convolutions
    with bias and PyTorch's default initialisation, no normalisation layer."""

    def __init__(self, in_dim: int, dim: int, dropout: float = 0.1):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"stego.dropout must be in [0, 1), got {dropout}")
        self.in_dim = in_dim
        self.dropout = dropout
        self.linear = nn.Conv2d(in_dim, dim, kernel_size=1)  # L1: C -> D
        self.nonlinear = nn.Sequential(  # L3(relu(L2(.))): C -> C -> D
            nn.Conv2d(in_dim, in_dim, kernel_size=1),
            nn.ReLU(),
            nn.Conv2d(in_dim, dim, kernel_size=1),
        )

    @property
    def dim(self) -> int:
        """The code width D."""
        return self.linear.out_channels

    def forward(self, f: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """(B, C, h, w) frozen features -> (features for the loss, code (B, D, h, w)).

        With a generator (training) three independent channel-dropout masks are drawn in the order of the module
        docstring: linear branch, nonlinear branch, loss features (the reference hands the loss a dropped-out `f`,
        docs/stego.md §2). With None (evaluation) there is no dropout and `f` itself is returned. Cached fp16
        features are computed in the head's dtype (float32)."""
        f = f.to(self.linear.weight.dtype)
        if generator is None:
            return f, self.linear(f) + self.nonlinear(f)
        code = self.linear(channel_dropout(f, self.dropout, generator))  # §2 drop_a
        code = code + self.nonlinear(channel_dropout(f, self.dropout, generator))  # §2 drop_b
        f_loss = channel_dropout(f, self.dropout, generator)  # §2 third mask: the loss sees dropped-out features
        return f_loss, code

    def codes(self, f: Tensor) -> Tensor:
        """Evaluation-mode code (no dropout): what the probes and the metrics see."""
        return self.forward(f, None)[1]
