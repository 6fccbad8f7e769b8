"""The trained heads of HCL (docs/hcl.md §2): online head, projector, predictor and their momentum copy."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from pipeline.methods.hp.heads import ema_update

SEG_DIM, HIDDEN_DIM, OUT_DIM, N_HEADS = 768, 2048, 256, 12


def init_weights(module: nn.Module) -> None:
    """§4's head initialization, on every submodule: Linear weights trunc_normal(std 0.02), biases 0; LayerNorm
    weight 1, bias 0. Truncated at ±2 absolute (100 std), as the reference's and timm's trunc_normal_ default."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class OnlineHead(nn.Module):
    """Linear(width -> 768), LayerNorm, one ViT block (768-d, 12 heads), LayerNorm: the segmentation features."""

    def __init__(self, width: int, dim: int = SEG_DIM, num_heads: int = N_HEADS):
        super().__init__()
        self.embed = nn.Linear(width, dim)
        self.norm_in = nn.LayerNorm(dim)
        self.block = Block(dim=dim, num_heads=num_heads, mlp_ratio=4.0, qkv_bias=True)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n, width) -> (B, n, 768); attention mixes the n tokens of one image."""
        return self.norm_out(self.block(self.norm_in(self.embed(x))))


def _mlp(dims: list[int]) -> nn.Sequential:
    """Linear layers with GELU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


class Projector(nn.Module):
    """MLP 768 -> 2048 -> 2048 -> 256, L2-normalized output (q or k)."""

    def __init__(self, in_dim: int = SEG_DIM, hidden: int = HIDDEN_DIM, out_dim: int = OUT_DIM):
        super().__init__()
        self.mlp = _mlp([in_dim, hidden, hidden, out_dim])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=-1)


class Predictor(nn.Module):
    """MLP 256 -> 2048 -> 256 (not normalized; the loss normalizes it)."""

    def __init__(self, dim: int = OUT_DIM, hidden: int = HIDDEN_DIM):
        super().__init__()
        self.mlp = _mlp([dim, hidden, dim])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class HCLModel(nn.Module):
    """Online head + projector + predictor, and an EMA copy of head + projector that gets no gradient.

    Head and projector (the reference's SegHead: its Linear, LayerNorms, transformer block and projection MLP) get
    `init_weights`; the predictor keeps PyTorch's default Linear init, as the reference's (built outside SegHead,
    never re-initialized). The momentum copy is taken after the init, so it starts equal to the online branch.
    """

    def __init__(self, width: int, dim: int = SEG_DIM, hidden: int = HIDDEN_DIM, out_dim: int = OUT_DIM,
                 num_heads: int = N_HEADS):
        super().__init__()
        self.head = OnlineHead(width, dim, num_heads)
        self.projector = Projector(dim, hidden, out_dim)
        self.predictor = Predictor(out_dim, hidden)
        init_weights(self.head)
        init_weights(self.projector)
        self.momentum_head = copy.deepcopy(self.head)
        self.momentum_projector = copy.deepcopy(self.projector)
        for p in [*self.momentum_head.parameters(), *self.momentum_projector.parameters()]:
            p.requires_grad_(False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n, width) -> (B, n, 768) segmentation features of the online head (evaluation)."""
        return self.head(x)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """View 1 through the online branch, view 2 through the momentum branch: (q, pred(q), k), each (B, n, 256)."""
        q = self.projector(self.head(x1))
        return q, self.predictor(q), self.momentum_keys(x2)

    @torch.no_grad()
    def momentum_keys(self, x: torch.Tensor) -> torch.Tensor:
        """k = normalized momentum projection (also what MoGoClustering samples)."""
        return self.momentum_projector(self.momentum_head(x))

    @torch.no_grad()
    def momentum_update(self, m: float = 0.996) -> None:
        """θ_k ← m·θ_k + (1−m)·θ_q for head and projector."""
        ema_update(self.momentum_head, self.head, m)
        ema_update(self.momentum_projector, self.projector, m)


def build_model(width: int, settings: dict) -> HCLModel:
    """The model a config's [hcl] section (or a checkpoint's copy of it) describes."""
    return HCLModel(width, settings["dim"], settings["hidden"], settings["out_dim"], settings["heads"])
