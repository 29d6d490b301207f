"""The per-tensor statistics a recorded pass takes: moments, ReLU counts, norms.

They run on every layer's output, input, ReLU output and output gradient after
every epoch, so they are written for few passes over each tensor (issue #9: on a 2-core CPU the
straightforward forms cost as much again as the probe's forward and backward). They give the
straightforward forms' numbers up to float32 rounding; the rare cases those forms handle specially
(all zeros, non-finite, huge values, one example) go to those forms.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sweeper.diagnostics.layers import LayerInfo

__all__ = ["abs_max", "layer_norms", "norms", "output_moments", "read_floats", "relu_counts",
           "relu_fractions", "relu_stats", "second_moment", "sensitivity", "std"]


# Squares are first taken unscaled, which is exact where they stay in float32's normal range: a
# finite result (no square or sum overflowed) with E[x^2] >= M2_SAFE, where what underflow can lose
# (< 1.2e-38 per value) is below float32's rounding. Otherwise the tensor is divided by its largest
# magnitude first, as the plain forms always do (vanished signals reach 1e-20 in stalled nets).
M2_SAFE = 1e-20
HUGE = 1e30  # a largest magnitude above this: float32 means and variances may overflow; the plain forms


def abs_max(x: torch.Tensor) -> float:
    """max |x| as a float, NaN if x has a NaN. amax and amin read x without writing an |x| copy."""
    if x.numel() == 0:
        return 0.0
    hi, lo = float(x.amax()), float(x.amin())
    return math.nan if math.isnan(hi) or math.isnan(lo) else max(hi, -lo)


def read_floats(scalars: list[torch.Tensor]) -> list[float]:
    """Device scalars as floats, in one read."""
    if not scalars:
        return []
    if len({t.dtype for t in scalars}) > 1:
        return [float(t) for t in scalars]
    return torch.stack(scalars).tolist()


def layer_norms(layers: list[LayerInfo]) -> dict[str, tuple[float, float | None]]:
    """Each layer's weight norm and bias norm (None without a bias), in one fused call each."""
    with torch.no_grad():
        weights = norms([l.module.weight.detach() for l in layers])
        biased = [l for l in layers if getattr(l.module, "bias", None) is not None]
        biases = dict(zip([l.key for l in biased], norms([l.module.bias.detach() for l in biased])))
    return {l.key: (w, biases.get(l.key)) for l, w in zip(layers, weights)}


def norms(tensors: list[torch.Tensor], ord: float = 2) -> list[float]:
    """Each tensor's vector norm, in one fused call and one read."""
    if not tensors:
        return []
    return read_floats(list(torch._foreach_norm(tensors, ord)))


def output_moments(out: torch.Tensor) -> tuple[float, float, float, float]:
    """(mean, unbiased variance, E[y^2], :func:`sensitivity`) of a layer's output y, from one centring
    per unit: the per-unit means mu_u and sums of squared deviations ss_u (which the sensitivity needs
    anyway) give the variance as (sum ss_u + N sum (mu_u - mu)^2) / (n - 1) and E[y^2] as
    (sum ss_u + N sum mu_u^2) / n -- sums of non-negative terms, no cancellation. ~5 passes over y
    instead of ~20 for var(), mean(), second_moment() and sensitivity() apart."""
    out = out.float()
    if out.dim() < 1 or out.shape[0] < 2:
        return float(out.mean()), float(out.var()), second_moment(out), sensitivity(out)
    moments = centred_moments(out, 1.0)
    if not M2_SAFE <= moments[2] < math.inf:  # also NaN: see M2_SAFE
        scale = abs_max(out)
        if not 0.0 < scale <= HUGE:  # also NaN
            return float(out.mean()), float(out.var()), second_moment(out), sensitivity(out)
        moments = centred_moments(out, scale)
    return moments


def centred_moments(out: torch.Tensor, k: float) -> tuple[float, float, float, float]:
    """:func:`output_moments` of out / k, given back in out's units."""
    n = out.numel()
    flat = (out if k == 1.0 else out / k).reshape(out.shape[0], -1)
    examples, units = flat.shape
    mu = flat.mean(dim=0)
    ss = (flat - mu).square_().sum(dim=0)
    grand = mu.mean()
    between = (mu - grand).square_().sum()
    mean, within, between, std_sum = torch.stack(
        (grand, ss.sum(), between, ss.sqrt().sum())).double().tolist()
    var = (within + examples * between) / (n - 1) * k * k
    if not 1.1754943508222875e-38 <= var <= 3.4028234663852886e38:
        # The plain var() is float32: it flushes (or underflows) and overflows as a float32 does.
        var = float(torch.tensor(var, dtype=torch.float64, device=out.device).float())
    m2 = (within + examples * (between + units * mean * mean)) / n  # in units of k^2
    std_mean = std_sum / units / math.sqrt(examples - 1)
    return mean * k, var, m2 * k * k, std_mean / math.sqrt(m2) if m2 > 0 else 0.0


def std(t: torch.Tensor) -> float:
    """t.std() as a float, ~3x cheaper on a CPU than std()'s Welford pass: from the sum of squares
    where the mean is too small to cancel a relevant part of it (n mean^2 <= half of it), else centred."""
    t = t.float()
    n = t.numel()
    if n < 2:
        return float(t.std())
    mean, squares = torch.stack((t.mean(), t.square().sum())).double().tolist()
    if M2_SAFE <= squares / n < math.inf and n * mean * mean <= squares / 2:
        return math.sqrt((squares - n * mean * mean) / (n - 1))
    scale = abs_max(t)
    if not 0.0 < scale <= HUGE:  # also NaN
        return float(t.std())
    x = t / scale
    return math.sqrt(float((x - x.mean()).square_().sum()) / (n - 1)) * scale


def relu_counts(out: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Per unit (channel) of a ReLU's output, how many of its values are positive; with the number of
    values and the output, for :func:`relu_fractions`. A ReLU's outputs are >= 0, so sign() counts
    them (~10x cheaper on a CPU than comparisons: no bool tensors); a NaN makes its unit's count NaN."""
    if out.dim() <= 1:
        return out.sign(), out.numel(), out
    per = out.sign().sum(dim=0)
    if per.dim() > 1:
        per = per.reshape(out.shape[1], -1).sum(dim=1, dtype=torch.float64)
    return per, out.numel(), out


def relu_fractions(per_unit: torch.Tensor, numel: int, out: torch.Tensor) -> tuple[float, float]:
    """(zero_frac, dead_frac) from :func:`relu_counts`; outputs with a NaN: :func:`relu_stats`."""
    positive, dead = torch.stack((per_unit.sum(), (per_unit == 0).sum())).double().tolist()
    if numel == 0 or math.isnan(positive):
        return tuple(float(v) for v in relu_stats(out))
    return 1.0 - positive / numel, dead / per_unit.numel()


def relu_stats(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fraction of zero outputs, fraction of units zero for every example and position)."""
    positive = out > 0
    zero_frac = 1.0 - positive.float().mean()
    # A unit is a channel: alive if positive for any example and position (no transposed copy).
    per_unit = positive.any(dim=0).reshape(out.shape[1], -1).any(dim=1) if out.dim() > 1 else positive
    return zero_frac, 1.0 - per_unit.float().mean()


def second_moment(x: torch.Tensor) -> float:
    """E[x^2] as a Python float, exact for vanished signals: where x's squares would leave float32's
    range (see M2_SAFE), x is scaled by its largest magnitude first, because a std of 1e-20 squares
    below float32's range (and denormals are flushed on CPU). Cheaper than squaring a float64 copy of
    the activation (3x on a CPU, per layer and epoch)."""
    x = x.detach()
    if x.numel() == 0:
        return 0.0
    m2 = float(x.float().square().mean())  # unscaled first: see M2_SAFE
    if M2_SAFE <= m2 < math.inf:
        return m2
    scale = abs_max(x)
    if scale == 0.0 or not math.isfinite(scale):
        return 0.0 if scale == 0.0 else math.inf
    return float((x.float() / scale).square().mean()) * scale * scale


def sensitivity(out: torch.Tensor) -> float:
    """Mean over units of (std across examples) / RMS of the output.

    The ratio does not change with the output's scale, so the output is scaled by its largest
    magnitude (a vanished signal stays representable in float32), and the per-unit std is taken on
    the centred output (``Tensor.std(dim=0)`` costs ~15x as much on a CPU: a strided Welford pass).
    """
    scale = abs_max(out)
    if scale == 0.0 or not math.isfinite(scale) or out.shape[0] < 2:
        return 0.0
    x = out.float() / scale
    centred = x - x.mean(dim=0, keepdim=True)
    std = (centred.pow(2).sum(dim=0) / (x.shape[0] - 1)).sqrt()
    return float(std.mean() / x.pow(2).mean().sqrt())

