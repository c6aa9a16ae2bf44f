"""The quantization math, on plain tensors: grids, round-to-nearest, GPTQ and the Hessians it needs.

Weights are [out, in] float32 (`W`); groups run along `in`. A `Grid` turns a group of weights into
a scale and a zero point; the dequantized weight is always `scale * (q - zero)` with integer codes
`q` in [0, 2**bits - 1]. GPTQ (Frantar et al., 2022) quantizes one input column at a time and
spreads each column's rounding error over the columns not yet quantized, weighted by the inverse
Hessian of the layer's reconstruction loss, H = 2 X^T X over the calibration inputs X.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Grid:
    bits: int
    group_size: int
    sym: bool = False
    float_zero: bool = False  # asymmetric with a float zero point (min..max exactly), not an integer one

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def params(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point [rows] for the weights of one group [rows, cols].

        Scales are rounded to float16 here because that is how the checkpoint stores them, so the
        codes are chosen against the scale the quantized model will actually use.
        """
        low, high = w.min(dim=1).values, w.max(dim=1).values
        if self.sym:
            high = torch.maximum(low.abs(), high.abs())
            low = -high
        elif not self.float_zero:  # an integer zero point needs 0 inside the range
            low, high = low.clamp(max=0), high.clamp(min=0)
        flat = high - low == 0
        low, high = torch.where(flat, low - 1, low), torch.where(flat, high + 1, high)
        scale = ((high - low) / self.maxq).half().float()
        scale = torch.where(scale == 0, torch.full_like(scale, 2**-14), scale)  # below float16's normal range
        if self.sym:
            zero = torch.full_like(scale, (self.maxq + 1) / 2)
        elif self.float_zero:  # the minimum as the float16 a GGUF Q4_1 block stores (m = -scale * zero), exact there too
            zero = -low.half().float() / scale
        else:
            zero = torch.round(-low / scale).clamp(0, self.maxq)
        return scale, zero

    def codes(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Integer codes (as float) of weights w [rows, cols] (or [rows]) under per-row scale/zero."""
        if w.dim() == 2:
            scale, zero = scale.unsqueeze(1), zero.unsqueeze(1)
        return torch.clamp(torch.round(w / scale + zero), 0, self.maxq)


@dataclass
class Quantized:
    """One quantized layer: codes [out, in], scales and zeros [out, groups], group of each input column."""

    codes: torch.Tensor  # uint8
    scales: torch.Tensor  # float32, values exactly representable in float16
    zeros: torch.Tensor  # float32 (integers unless the grid has a float zero)
    g_idx: torch.Tensor  # int32 [in]
    grid: Grid

    def dequantize(self) -> torch.Tensor:
        g = self.g_idx.long()
        return self.scales[:, g] * (self.codes.float() - self.zeros[:, g])


def check_group_size(grid: Grid, in_features: int) -> None:
    if in_features % grid.group_size:
        raise ValueError(f"group size {grid.group_size} does not divide {in_features} input features")


def rtn(w: torch.Tensor, grid: Grid) -> Quantized:
    """Round-to-nearest, group by group: the baseline GPTQ must beat."""
    check_group_size(grid, w.shape[1])
    rows, cols = w.shape
    groups = w.float().reshape(rows, cols // grid.group_size, grid.group_size)
    scales, zeros = zip(*(grid.params(groups[:, g]) for g in range(groups.shape[1])))
    scales, zeros = torch.stack(scales, 1), torch.stack(zeros, 1)
    codes = torch.clamp(torch.round(groups / scales.unsqueeze(2) + zeros.unsqueeze(2)), 0, grid.maxq)
    g_idx = torch.arange(cols, dtype=torch.int32) // grid.group_size
    return Quantized(codes.reshape(rows, cols).to(torch.uint8).cpu(), scales.cpu(), zeros.cpu(), g_idx, grid)


def gptq(w: torch.Tensor, hessian: torch.Tensor, grid: Grid, *, act_order: bool = False, damp: float = 0.01, block: int = 32) -> Quantized:
    """GPTQ with lazy batched updates (blocks of columns) and a Cholesky factor of H^-1.

    Groups are the natural contiguous column groups (g_idx[k] == k // group_size) in every mode:
    without act-order their scale/zero are taken from the error-updated weights when the first
    column of the group is reached; with act-order (columns in order of decreasing H diagonal)
    they are fixed from the original weights beforehand ("static groups"), so exporters never
    need a column permutation. `block` is small because on CPU the per-column update inside a
    block, not the matrix product between blocks, is what costs time.
    """
    check_group_size(grid, w.shape[1])
    W = w.detach().float().clone()
    rows, cols = W.shape
    gs = grid.group_size
    H = hessian.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    static = [grid.params(W[:, g : g + gs]) for g in range(0, cols, gs)] if act_order else None
    order = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols, device=H.device)
    W, H = W[:, order], H[order][:, order]

    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    # Upper Cholesky factor of H^-1. The widest layer's H is ~100 MB per copy on a 0.5B model, so each
    # step drops what the next does not need: at most two such matrices live here at once.
    L = _cholesky(H)
    del H
    inverse = torch.cholesky_inverse(L)
    del L
    Hinv = torch.linalg.cholesky(inverse, upper=True)
    del inverse

    codes = torch.zeros_like(W)
    scales = torch.zeros(rows, cols // gs, device=W.device)
    zeros = torch.zeros_like(scales)
    groups = (order // gs).tolist()
    for start in range(0, cols, block):
        end = min(start + block, cols)
        W1 = W[:, start:end].clone()
        Err = torch.zeros_like(W1)
        Hinv1 = Hinv[start:end, start:end]
        for i in range(end - start):
            col, group = start + i, groups[start + i]
            if static is not None:
                scale, zero = static[group]
                scales[:, group], zeros[:, group] = scale, zero
            elif col % gs == 0:  # the group's weights as updated so far
                ahead = W1[:, i : i + gs]
                if ahead.shape[1] < gs:
                    ahead = torch.cat([ahead, W[:, end : end + gs - ahead.shape[1]]], 1)
                scale, zero = grid.params(ahead)
                scales[:, group], zeros[:, group] = scale, zero
            w = W1[:, i]
            q = grid.codes(w, scale, zero)
            codes[:, col] = q
            err = Err[:, i]
            torch.sub(w, scale * (q - zero), out=err)
            err /= Hinv1[i, i]
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)
        W[:, end:] -= Err @ Hinv[start:end, end:]

    codes = codes[:, torch.argsort(order)]
    g_idx = torch.arange(cols, dtype=torch.int32) // gs
    return Quantized(codes.to(torch.uint8).cpu(), scales.cpu(), zeros.cpu(), g_idx, grid)


def _cholesky(H: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of H, adding damping to the diagonal until H is positive definite."""
    mean = torch.mean(torch.diag(H))
    extra = 0.0
    for _ in range(8):
        damped = H
        if extra:
            damped = H.clone()
            damped.diagonal().add_(extra * mean)
        L, info = torch.linalg.cholesky_ex(damped)
        if not info:
            return L
        del L, damped
        extra = extra * 10 if extra else 0.01
    raise RuntimeError("the Hessian stays singular even with heavy damping; give more calibration text")


def reconstruction_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """Mean over output rows of (w - w_hat) H (w - w_hat)^T: the layer's output error on the calibration inputs."""
    delta = w.float() - w_hat.float()
    return float(((delta @ hessian.float()) * delta).sum() / w.shape[0])


class Hessians:
    """Accumulates H = 2/n sum x x^T per linear layer from forward hooks.

    Projections that read the very same input tensor (q/k/v, gate/up) share one accumulator, so
    X^T X is computed once for them.
    """

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.alias: dict[str, str] = {}
        self._last: tuple[torch.Tensor | None, str] = (None, "")
        self._handles = []

    def watch(self, modules: dict[str, torch.nn.Module]) -> Hessians:
        for name, module in modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name: str):
        def hook(module, inputs, output):
            x = inputs[0]
            if x is self._last[0]:
                self.alias[name] = self._last[1]
                return
            self._last = (x, name)
            self.alias[name] = name
            x = x.detach().reshape(-1, x.shape[-1]).float()
            if name not in self.sums:
                self.sums[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
                self.counts[name] = 0
            self.sums[name].addmm_(x.t(), x)
            self.counts[name] += x.shape[0]

        return hook

    def get(self, name: str) -> torch.Tensor:
        key = self.alias[name]
        return self.sums[key] * (2.0 / self.counts[key])

    def take(self, name: str) -> torch.Tensor:
        """`get` without a copy: the accumulator itself, scaled, and no longer kept here."""
        key = self.alias[name]
        return self.sums.pop(key).mul_(2.0 / self.counts[key])

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._last = (None, "")
