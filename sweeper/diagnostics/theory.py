"""He et al.'s forward theory: what each layer's output scale should be, from its weights alone.

:func:`predicted_gain` is one layer's E[y^2] / E[x^2] (n E[w^2] rho + E[b^2] / E[x^2], rho from
:func:`padding_fraction`); :func:`chain_second_moments` carries E[x^2] through a chain of modules
(convs, ReLUs, BatchNorm, pooling, dropout, LRN); :func:`predicted_stds` is the init scheme's
prediction for a plain stack. The diagnostics hook logs these beside what it measured
(``gain_pred``/``gain_meas``, ``act_std_pred``/``act_std``).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import torch
from torch import nn

from sweeper.config import ModelConfig
from sweeper.diagnostics import stats
from sweeper.diagnostics.layers import NORMS, WEIGHTED, LayerInfo
from sweeper.inits import fans, weight_std

__all__ = ["chain_second_moments", "layer_gain", "maxpool_factor", "padding_fraction",
           "position_energy", "predicted_gain", "predicted_stds", "relu_correlation", "scheme_gain",
           "spatial_correlation"]


def padding_fraction(module: nn.Module, size: tuple[int, ...] | None,
                     energy: torch.Tensor | None = None) -> float:
    """rho: the average fraction of a conv's taps that land inside an input map of ``size``.

    Zero padding feeds the taps outside the map zeros, so a conv's output variance is n Var[w] rho
    E[x^2], not n Var[w] E[x^2]. Exact for any kernel, stride, padding and dilation: per spatial axis,
    count the taps inside the map over all output positions; the 2-D fraction is the product of the
    axes' (the inside count is separable). A 3x3/pad 1 conv on HxH gives ((3H - 2) / 3H)^2: 0.96, 0.84,
    0.44, 0.11 at H = 32, 8, 2, 1. Linear layers (and non-zero padding modes) have rho = 1.

    ``energy`` (an HxW map of the input's E[x^2] per position, :func:`position_energy`) weights each
    tap by the energy at the position it reads: rho_eff = mean over outputs of sum_(taps inside)
    e(p + t) / (k*k mean(e)), the same as rho on a flat map. Inside a net the map is not flat: the
    previous zero-padded conv gave its border outputs fewer taps, so a map's rim carries less energy
    than its centre, and a 3x3 conv -- whose border taps are the ones that fall off the map -- reads
    more of the centre than flat rho assumes: +5-11% on 4x4 and 8x8 maps (issue #10's measurement).
    """
    if not isinstance(module, nn.Conv2d) or not size or module.padding_mode != "zeros":
        return 1.0
    if energy is not None and energy.dim() == 2 and tuple(energy.shape) == tuple(size[-2:]):
        return _weighted_padding_fraction(module, energy)
    rho = 1.0
    for axis, length in enumerate(size[-2:]):
        k, s, d = module.kernel_size[axis], module.stride[axis], module.dilation[axis]
        pad = module.padding
        # 'same' pads d(k-1) in total; PyTorch puts the odd one at the end, which the count ignores.
        p = {"valid": 0, "same": d * (k - 1) // 2}[pad] if isinstance(pad, str) else pad[axis]
        outputs = (length + 2 * p - d * (k - 1) - 1) // s + 1
        if outputs <= 0:
            return math.nan
        inside = sum(1 for o in range(outputs) for t in range(k) if 0 <= o * s - p + t * d < length)
        rho *= inside / (outputs * k)
    return rho


def _weighted_padding_fraction(conv: nn.Conv2d, energy: torch.Tensor) -> float:
    """rho weighted by the input's energy per position (see :func:`padding_fraction`): a conv of the
    map with an all-ones kernel (the conv's own stride, padding and dilation) sums, per output
    position, the energy its in-map taps read."""
    e = energy.detach().double()
    mean = float(e.mean())
    if not math.isfinite(mean) or mean <= 0:
        return padding_fraction(conv, tuple(energy.shape))
    ones = torch.ones(1, 1, *conv.kernel_size, dtype=torch.float64, device=e.device)
    read = nn.functional.conv2d((e / mean)[None, None], ones, stride=conv.stride, padding=conv.padding,
                                dilation=conv.dilation)
    if read.numel() == 0:
        return math.nan
    return float(read.mean()) / ones.numel()


def position_energy(x: torch.Tensor) -> torch.Tensor | None:
    """E[x^2] per spatial position of a batch of maps (N, C, H, W), over examples and channels: an HxW
    float64 map, exact for vanished signals (scaled by the largest magnitude first where the squares
    would leave float32's range, as :func:`stats.second_moment`). Its mean is E[x^2]. None for inputs
    without two spatial axes."""
    if x.dim() != 4 or x.numel() == 0:
        return None
    x = x.detach()
    energy = x.float().square().mean(dim=(0, 1)).double()  # unscaled first: see stats.M2_SAFE
    if stats.M2_SAFE <= float(energy.mean()) < math.inf:
        return energy
    scale = stats.abs_max(x)
    if scale == 0.0 or not math.isfinite(scale):
        return torch.full(tuple(x.shape[2:]), 0.0 if scale == 0.0 else math.inf, dtype=torch.float64)
    return (x.float() / scale).square().mean(dim=(0, 1)).double() * (scale * scale)


def predicted_gain(module: nn.Module, size: tuple[int, ...] | None, input_second_moment: float, *,
                   input_energy: torch.Tensor | None = None) -> float:
    """Var[y] / E[x^2] predicted for one conv or linear layer with random weights:
    n E[w^2] rho + E[b^2] / E[x^2].

    He et al.: y = sum_j w_j x_j + b over n = k*k*C_in (fan-in) taps, with zero-mean weights
    independent of the input, gives E[y^2] = n E[w^2] rho E[x^2] + E[b^2], rho the fraction of taps
    inside the map (:func:`padding_fraction`). E[w^2] and E[b^2] are the layer's actual ones (not the
    scheme's formula), which removes the sampling noise of the init from the comparison; PyTorch's
    default init draws biases ~ U(+-1/sqrt(n)), which dominate once the signal has vanished.

    With ``input_energy`` (the real input's E[x^2] per position, :func:`position_energy`) rho is
    weighted by where the energy sits, and the prediction is the exact expectation over this layer's
    weights given its input: E_w[E[y^2]] = E[w^2] sum over in-map taps of E[x^2] + E[b^2], whatever the
    input's correlations. What is left between it and one measurement is the spread of one weight
    draw: E[y^2] = mean over output units u of w_u' M w_u, M the second-moment matrix of the input
    patches, whose relative std is sqrt(2 tr(M^2) / C_out) / tr(M) for Gaussian weights. Deep ReLU
    features of different inputs point nearly the same way (their correlation tends to 1), so M is
    close to rank 1 and a 10-class head's gain is a chi^2_10 / 10 variable: +-45% from one draw.
    """
    w2 = float(module.weight.detach().float().pow(2).mean())
    bias = getattr(module, "bias", None)
    b2 = float(bias.detach().float().pow(2).mean()) if bias is not None else None
    return layer_gain(fans(module)[0], w2, b2, padding_fraction(module, size, input_energy),
                      input_second_moment)


def layer_gain(fan_in: int, w2: float, b2: float | None, rho: float, input_second_moment: float) -> float:
    """:func:`predicted_gain` from E[w^2], E[b^2] (None: no bias) and rho."""
    gain = fan_in * w2 * rho
    if b2 is not None:
        gain += b2 / input_second_moment if input_second_moment > 0 else (math.inf if b2 > 0 else 0.0)
    return gain


def maxpool_factor(taps: int, correlation: float = 0.0) -> float:
    """E[max-pool(relu(y))^2] / E[relu(y)^2] over ``taps`` zero-mean Gaussian y with pairwise
    ``correlation`` (derived, not fitted).

    Write y_i = sqrt(c) z_0 + sqrt(1 - c) z_i with independent standard normals; the pool's output is
    max(0, sqrt(c) z_0 + sqrt(1 - c) M), M the largest of ``taps`` standard normals, whose density is
    k Phi^(k-1) phi. Its second moment is a 2-D integral, done here on a grid, over E[relu(y)^2] = 1/2.
    2x2 pools: 3.09 for independent taps, 2.67 at c = 1/pi, 1.77 at c = 0.83, 1 at c = 1: neighbouring
    conv outputs are correlated, which is why the science notes saw 1.8-2.6 and not 3.1.
    """
    c = min(max(correlation, 0.0), 1.0)
    if taps <= 1 or c >= 1.0:
        return 1.0
    key = (taps, round(c, 3))
    if key not in _MAXPOOL_FACTORS:
        _MAXPOOL_FACTORS[key] = _maxpool_factor(taps, key[1])
    return _MAXPOOL_FACTORS[key]


def _maxpool_factor(k: int, c: float, steps: int = 160, half_width: float = 8.0) -> float:
    h = 2 * half_width / steps
    grid = [-half_width + i * h for i in range(steps + 1)]
    phi = [math.exp(-t * t / 2) / math.sqrt(2 * math.pi) for t in grid]
    p_max = [k * (0.5 * (1 + math.erf(t / math.sqrt(2)))) ** (k - 1) * f * h for t, f in zip(grid, phi)]
    a, b = math.sqrt(c), math.sqrt(1 - c)
    total = 0.0
    for z, pz in zip(grid, phi):
        for m, pm in zip(grid, p_max):
            v = a * z + b * m
            if v > 0:
                total += pz * h * pm * v * v
    return 2.0 * total


_MAXPOOL_FACTORS: dict[tuple[int, float], float] = {}


def relu_correlation(c: float) -> float:
    """E[relu(a) relu(b)] / E[relu(a)^2] for zero-mean Gaussians a, b of correlation c (Cho & Saul's
    arc-cosine kernel): (sqrt(1 - c^2) + (pi - arccos c) c) / pi; 1/pi at c = 0, 1 at c = 1."""
    c = min(max(c, -1.0), 1.0)
    return (math.sqrt(1 - c * c) + (math.pi - math.acos(c)) * c) / math.pi


def spatial_correlation(x: torch.Tensor) -> float:
    """E[x(p) x(q)] / E[x^2] over neighbouring positions p, q of a 2x2 block (horizontal, vertical,
    diagonal, weighted as a 2x2 pool's six pairs): the input's share of the chain's correlation."""
    if x.dim() < 4 or min(x.shape[-2:]) < 2:
        return 0.0
    x = x.detach().float()
    m2 = x.pow(2).mean()
    if m2 == 0:
        return 0.0
    h = (x[..., :, 1:] * x[..., :, :-1]).mean()
    v = (x[..., 1:, :] * x[..., :-1, :]).mean()
    d = ((x[..., 1:, 1:] * x[..., :-1, :-1]).mean() + (x[..., 1:, :-1] * x[..., :-1, 1:]).mean()) / 2
    return float((h + v + d) / 3 / m2)


def chain_second_moments(chain: list[nn.Module], input_second_moment: float,
                         input_size: tuple[int, ...] | None = None, *,
                         input_correlation: float = 0.0) -> list[tuple[nn.Module, float]]:
    """He et al.'s forward theory along a chain of modules: [(module, E[output^2])], predicted.

    Starting from the network input's E[x^2] (measured; it is not rectified, so the first layer
    needs no factor 1/2), each module maps E[x^2] to E[out^2]:
      conv / linear   n E[w^2] rho E[x^2] + E[b^2] (:func:`predicted_gain`; its output is zero-mean
                      and symmetric)
      ReLU            E[y^2] / 2 for a zero-mean symmetric y; no change on an already rectified input
      BatchNorm       resets the scale: mean(gamma^2 + beta^2) (1 at init), symmetric again
      max-pool        x :func:`maxpool_factor` of the window's taps inside the map, over rectified
                      inputs, at the predicted correlation of neighbouring taps (below)
      dropout         x 1 / (1 - p): the probe runs in train mode (inverted dropout scales kept units up)
      LRN             / k^(2 beta): its small-signal limit (k = 2, beta = 0.75: / 2.83)
      average pool    unchanged when it only repeats a map (1x1 -> 7x7); a global average over P
                      positions gives E[x^2] (1/P + (1 - 1/P) r), r the neighbours' correlation
      flatten, identity: unchanged
    Any other module ends the prediction (the returned list stops there).

    The max-pool factor needs the correlation c of neighbouring pre-activations, which the chain
    carries too (mean-field theory of random conv nets, Xiao et al. 2018): with zero-mean independent
    weights, E[y(p) y(q)] = Var[w] sum over the tap indices inside the map at *both* positions of
    E[x x'] of the input, so a conv passes on the input's neighbour correlation r times omega, the
    shared in-map taps over the geometric mean of each position's in-map taps (1 on large maps,
    0.5 for neighbours on a 2x2 map: zero padding decorrelates small maps); a ReLU maps c to
    :func:`relu_correlation`; pools and dropout (r x (1 - p)) follow. All nearby lags are treated as one
    (the 2x2 block's six pairs), and the input's r is measured (:func:`spatial_correlation`).
    """
    out: list[tuple[nn.Module, float]] = []
    m2, symmetric = input_second_moment, True
    c = r = min(max(input_correlation, 0.0), 1.0)  # c: pre-activation; r: of what flows now
    for mod, (size_in, size_out) in zip(chain, _chain_sizes(chain, input_size)):
        if isinstance(mod, WEIGHTED):
            m2 = predicted_gain(mod, size_in, m2) * m2
            c = r = r * _block_overlap(mod, size_in) if isinstance(mod, nn.Conv2d) else 0.0
            symmetric = True
        elif isinstance(mod, nn.ReLU):
            if symmetric:
                m2, r = m2 / 2, relu_correlation(c)
            symmetric = False
        elif isinstance(mod, NORMS):
            m2 = float((mod.weight.detach() ** 2 + mod.bias.detach() ** 2).mean()) if mod.affine else 1.0
            symmetric = True
        elif isinstance(mod, nn.MaxPool2d):
            m2 *= _pool_taps_factor(mod, size_in, c) if not symmetric else math.nan
        elif isinstance(mod, nn.Dropout):
            if 0 < mod.p < 1:  # the probe runs in train mode, whatever mode the model is in now
                m2, r = m2 / (1 - mod.p), r * (1 - mod.p)
        elif isinstance(mod, nn.LocalResponseNorm):
            m2 /= mod.k ** (2 * mod.beta)
        elif isinstance(mod, nn.AdaptiveAvgPool2d):
            positions = math.prod(size_in) if size_in else math.nan
            if positions == 1:
                pass  # repeats the one value
            elif size_out and tuple(size_out) == (1, 1):
                m2 *= 1 / positions + (1 - 1 / positions) * r
            else:
                break
        elif isinstance(mod, (nn.Flatten, nn.Identity)):
            pass
        else:
            break
        out.append((mod, m2))
        if not math.isfinite(m2):
            break
    return out


def _block_overlap(conv: nn.Conv2d, size: tuple[int, ...] | None) -> float:
    """omega: how much of its input's neighbour correlation a conv passes on, averaged over the six
    pairs of a 2x2 block of output positions (see :func:`chain_second_moments`)."""
    if not size or conv.padding_mode != "zeros":
        return 1.0
    axes = []
    for a in range(2):
        k, s, d = conv.kernel_size[a], conv.stride[a], conv.dilation[a]
        pad = conv.padding
        p = {"valid": 0, "same": d * (k - 1) // 2}[pad] if isinstance(pad, str) else pad[a]
        n = _out_len(conv, size[a], a)
        inside = [{t for t in range(k) if 0 <= o * s - p + t * d < size[a]} for o in range(n)]
        pairs = [len(inside[o] & inside[o + 1]) / math.sqrt(len(inside[o]) * len(inside[o + 1]))
                 for o in range(n - 1) if inside[o] and inside[o + 1]]
        axes.append(sum(pairs) / len(pairs) if pairs else 1.0)
    ax, ay = axes
    return (2 * ax + 2 * ay + 2 * ax * ay) / 6


def _chain_sizes(chain: list[nn.Module], size: tuple[int, ...] | None) -> list[tuple[Any, Any]]:
    """(input, output) spatial size of each module of a chain, by each module's own arithmetic."""
    out = []
    for mod in chain:
        size_in = size
        if size is not None:
            if isinstance(mod, (nn.Conv2d, nn.MaxPool2d)):
                size = tuple(_out_len(mod, size[a], a) for a in range(2))
            elif isinstance(mod, nn.AdaptiveAvgPool2d):
                o = mod.output_size
                o = (o, o) if isinstance(o, int) else o
                size = tuple(s if t is None else t for s, t in zip(size, o))
            elif isinstance(mod, (nn.Flatten, nn.Linear)):
                size = None
        out.append((size_in, size))
    return out


def _pair(v, axis):
    return v[axis] if isinstance(v, (tuple, list)) else v


def _out_len(mod: nn.Module, length: int, axis: int) -> int:
    k, s = _pair(mod.kernel_size, axis), _pair(mod.stride, axis) or _pair(mod.kernel_size, axis)
    p, d = _pair(mod.padding, axis), _pair(mod.dilation, axis)
    if isinstance(p, str):
        p = 0 if p == "valid" else d * (k - 1) // 2
    span = length + 2 * p - d * (k - 1) - 1
    if getattr(mod, "ceil_mode", False):
        n = -(-span // s) + 1
        if (n - 1) * s >= length + p:  # PyTorch: the last window must start inside the input
            n -= 1
        return n
    return span // s + 1


def _pool_taps_factor(mod: nn.MaxPool2d, size: tuple[int, ...] | None, correlation: float) -> float:
    """The mean over output positions of maxpool_factor(taps inside the map) for a max-pool."""
    if not size:
        return math.nan
    axes = []
    for a in range(2):
        k, s = _pair(mod.kernel_size, a), _pair(mod.stride, a) or _pair(mod.kernel_size, a)
        p, d = _pair(mod.padding, a), _pair(mod.dilation, a)
        n = _out_len(mod, size[a], a)
        axes.append([sum(1 for t in range(k) if 0 <= o * s - p + t * d < size[a]) for o in range(n)])
    # Most positions see the same number of taps: the factor once per distinct count.
    counts = Counter(i * j for i in axes[0] for j in axes[1])
    return sum(maxpool_factor(n, correlation) * c for n, c in counts.items()) / counts.total()


def predicted_stds(model_cfg: ModelConfig, layers: list[LayerInfo], *,
                   input_second_moment: float = 1.0) -> list[float]:
    """The init scheme's forward prediction for a plain stack of conv/linear layers with ReLUs between
    and nothing else (no padding, pooling or BatchNorm: :func:`chain_second_moments` handles those).

    Var[y_l] = n_l Var[w_l] E[x_l^2] with Var[w] from the scheme's formula and zero biases; E[x^2] of
    the network input for the first layer, then E[x_{l+1}^2] = Var[y_l] / 2 behind a ReLU.
    """
    out = []
    m2 = input_second_moment
    for l in layers:
        fan_in, fan_out = fans(l.module)
        var = fan_in * weight_std(model_cfg, fan_in, fan_out) ** 2 * m2
        out.append(math.sqrt(var))
        m2 = var / 2
    return out


def scheme_gain(cfg: ModelConfig, module: nn.Module, size: tuple[int, ...] | None) -> float:
    fan_in, fan_out = fans(module)
    try:
        return fan_in * weight_std(cfg, fan_in, fan_out) ** 2 * padding_fraction(module, size)
    except ValueError:
        return math.nan

