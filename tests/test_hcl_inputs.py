"""HCL's head inputs from cached branches (docs/hcl.md §1, §4): the one-pass assembly of both views equals the
per-view path and an independent float64 computation, and the training hooks and optimizer parts compute what they
did before they were split."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import torch

from pipeline.methods.hcl import training as hcl_training
from pipeline.methods.hcl.heads import HCLModel
from pipeline.methods.hcl.multilevel import concat_levels
from pipeline.methods.hcl.step import head_input, param_groups, two_variants, variant_levels, view_inputs

SIZES = (16, 32, 56)
GRIDS = {16: 14, 32: 7, 56: 4}  # 224 px views: what a real store holds (56 px: 4x4, not a divisor of 14)
C = 8


def _batch(b: int = 3, v: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """A store batch of float16 variants, as the reader yields it."""
    g = torch.Generator().manual_seed(seed)
    batch = {f"hcl_aug_p{p}": torch.randn(b, v, GRIDS[p], GRIDS[p], C, generator=g).half() for p in SIZES}
    batch["hcl_aug_cls"] = torch.randn(b, v, C, generator=g).half()
    batch["fg_mask"] = torch.rand(b, GRIDS[16], GRIDS[16], generator=g) > 0.5
    batch["index"] = torch.arange(b)
    return batch


def _bilinear64(grid: np.ndarray, size: int) -> np.ndarray:
    """(hi, wi, C) -> (size, size, C), bilinear with align_corners=False (half-pixel centres, clamped at the
    edges), written out in float64."""
    def taps(n_in: int) -> list[tuple[int, int, float]]:
        out = []
        for d in range(size):
            src = max((d + 0.5) * n_in / size - 0.5, 0.0)
            i0 = int(np.floor(src))
            i1 = min(i0 + 1, n_in - 1)
            out.append((i0, i1, src - i0))
        return out

    g = grid.astype(np.float64)
    rows, cols = taps(g.shape[0]), taps(g.shape[1])
    out = np.zeros((size, size, g.shape[2]))
    for y, (y0, y1, ly) in enumerate(rows):
        for x, (x0, x1, lx) in enumerate(cols):
            out[y, x] = ((1 - ly) * ((1 - lx) * g[y0, x0] + lx * g[y0, x1])
                         + ly * ((1 - lx) * g[y1, x0] + lx * g[y1, x1]))
    return out


def _naive_input(batch: dict[str, torch.Tensor], image: int, variant: int) -> np.ndarray:
    """One image's head input (h*w, 4C) in float64: finest branch, coarser ones upsampled, CLS at every position."""
    n = GRIDS[16]
    parts = [batch["hcl_aug_p16"][image, variant].double().numpy()]
    parts += [_bilinear64(batch[f"hcl_aug_p{p}"][image, variant].double().numpy(), n) for p in SIZES[1:]]
    parts.append(np.broadcast_to(batch["hcl_aug_cls"][image, variant].double().numpy(), (n, n, C)))
    return np.concatenate(parts, axis=-1).reshape(n * n, -1)


def _cat_levels(levels: dict[str, torch.Tensor]) -> torch.Tensor:
    """concat_levels as it was before it wrote into one output: float parts, then torch.cat."""
    b, h, w, c = levels["p16"].shape
    parts = [levels["p16"].float()]
    for p in SIZES[1:]:
        grid = levels[f"p{p}"].permute(0, 3, 1, 2).float()
        up = torch.nn.functional.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
        parts.append(up.permute(0, 2, 3, 1))
    parts.append(levels["cls"].float()[:, None, None, :].expand(b, h, w, c))
    return torch.cat(parts, dim=-1)


def test_concat_levels_equals_the_float_parts_concatenated_and_a_float64_upsampling():
    batch = _batch()
    levels = variant_levels(batch, SIZES, torch.tensor([0, 2, 1]))
    out = concat_levels(levels, "p16")
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert torch.equal(out, _cat_levels(levels))  # bit for bit
    for i, v in enumerate([0, 2, 1]):
        np.testing.assert_allclose(out[i].reshape(-1, 4 * C).numpy(), _naive_input(batch, i, v), atol=1e-5, rtol=0)


def test_view_inputs_equal_one_head_input_per_view_bit_for_bit():
    batch = _batch(b=4, v=3, seed=1)
    views = two_variants(4, 3, torch.Generator().manual_seed(5))
    assert not torch.equal(views[0], views[1])
    x1, x2 = view_inputs(batch, SIZES, views, torch.device("cpu"))
    for x, view in ((x1, views[0]), (x2, views[1])):
        assert x.shape == (4, GRIDS[16] ** 2, 4 * C) and x.is_contiguous()
        assert torch.equal(x, head_input(variant_levels(batch, SIZES, view), SIZES, torch.device("cpu")))
        for i in range(4):
            np.testing.assert_allclose(x[i].numpy(), _naive_input(batch, i, int(view[i])), atol=1e-5, rtol=0)


def test_view_inputs_of_one_or_three_views():
    batch = _batch(b=2, v=3, seed=2)
    views = [torch.tensor([2, 0]), torch.tensor([1, 1]), torch.tensor([0, 2])]
    xs = view_inputs(batch, SIZES, views, torch.device("cpu"))
    assert len(xs) == 3
    for x, view in zip(xs, views, strict=True):
        assert torch.equal(x, head_input(variant_levels(batch, SIZES, view), SIZES, torch.device("cpu")))
    (only,) = view_inputs(batch, SIZES, views[:1], torch.device("cpu"))
    assert torch.equal(only, xs[0])


def _hcl_training(batch: dict[str, torch.Tensor], seed: int) -> hcl_training.HCLTraining:
    """HCLTraining on a stand-in store holding `batch`'s arrays, built on the CPU with a seeded generator."""
    b, v = batch["hcl_aug_cls"].shape[:2]
    arrays = {"hcl_aug_cls": batch["hcl_aug_cls"], "feat": batch["hcl_aug_p16"][:, 0]}
    store = SimpleNamespace(attrs={"images": b, "patch_sizes": list(SIZES)}, array=lambda name: arrays[name])
    h_cfg = {"dim": 16, "hidden": 32, "out_dim": 8, "heads": 2, "seed": 3, "weight_decay": 0.04, "lr": 1e-3,
             "bank_replace": 0.5}
    method = hcl_training.HCLTraining(SimpleNamespace(log=print), {"hcl": h_cfg}, store)
    torch.manual_seed(seed)
    plan = SimpleNamespace(device=torch.device("cpu"), amp=False, loss_scaling=False)
    method.build(plan, torch.Generator().manual_seed(seed))
    return method


def test_training_inputs_draw_and_assemble_as_the_per_view_path():
    batch = _batch(b=3, v=2, seed=3)
    method = _hcl_training(batch, seed=11)
    x1, x2, fg = method.inputs(0, 0, batch)
    view1, view2 = two_variants(3, 2, torch.Generator().manual_seed(11))  # the same draws, from the same seed
    cpu = torch.device("cpu")
    assert torch.equal(x1, head_input(variant_levels(batch, SIZES, view1), SIZES, cpu))
    assert torch.equal(x2, head_input(variant_levels(batch, SIZES, view2), SIZES, cpu))
    assert torch.equal(fg, batch["fg_mask"].flatten(1))


def test_optimize_in_parts_equals_adamw_then_the_momentum_formula():
    """`optimize` (now backward, optimizer_step, momentum update) against AdamW and θ_k ← mθ_k + (1−m)θ_q written
    out on a copy of the model."""
    torch.manual_seed(0)
    model = HCLModel(12, dim=16, hidden=24, out_dim=8, num_heads=2)
    naive = copy.deepcopy(model)
    x1, x2 = torch.randn(2, 5, 12), torch.randn(2, 5, 12)
    opt = torch.optim.AdamW(param_groups(model, 0.04), lr=1e-3)
    naive_opt = torch.optim.AdamW(param_groups(naive, 0.04), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    m = 0.9
    for _ in range(3):
        q, p, k = model(x1, x2)
        hcl_training.optimize(model, (q * p).sum() + (q * k).sum(), opt, scaler, m)
        q, p, k = naive(x1, x2)
        naive_opt.zero_grad()
        ((q * p).sum() + (q * k).sum()).backward()
        naive_opt.step()
        with torch.no_grad():
            for online, ema in ((naive.head, naive.momentum_head), (naive.projector, naive.momentum_projector)):
                for a, b in zip(ema.parameters(), online.parameters(), strict=True):
                    a.copy_(m * a + (1 - m) * b)
    for (name, a), b in zip(model.state_dict().items(), naive.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    assert not torch.equal(model.momentum_head.embed.weight, model.head.embed.weight)  # the EMA really lags
