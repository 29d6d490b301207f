"""Tune's sampling functions without Ray, so a search-space file loads where only torch is installed.

A space file writes ``from ray import tune`` and ``tune.loguniform(1e-3, 1e-1)``. A GPU box kept for
debugging, or a laptop with torch alone, has no Ray, yet ``sweeper debug FILE`` and ``sweeper
validate FILE`` need nothing from Ray but those values. When ``import ray.tune`` fails,
:mod:`sweeper.loading` runs the file with this module standing in for ``ray.tune`` (and a bare
``ray`` package holding it), then takes both out of ``sys.modules`` again, so a later real import of
Ray is never shadowed.

Only the search-space surface is here: ``grid_search`` and the sampling domains (``uniform``,
``quniform``, ``loguniform``, ``qloguniform``, ``randn``, ``qrandn``, ``randint``, ``qrandint``,
``lograndint``, ``qlograndint``, ``choice``, ``sample_from``). Anything else a file asks of Ray
(``tune.Tuner``, ``ray.init``) raises an AttributeError that says Ray is needed for it.

The domains behave as Ray 2.60's (``ray/tune/search/sample.py``, read for this): the same bound
checks at construction, the same class and sampler names (which :mod:`sweeper.domains` reads to
describe and check a domain), and the same draws from a numpy ``RandomState``, so ``sweeper debug
FILE --sample N`` trains the same config with Ray installed or not. ``tests/test_tune_standin.py``
holds the two side by side and fails when Ray's sampling moves.
"""

from __future__ import annotations

import inspect
import math
import sys
import types
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["SAMPLING", "grid_search", "uniform", "quniform", "loguniform", "qloguniform", "randn",
           "qrandn", "randint", "qrandint", "lograndint", "qlograndint", "choice", "sample_from",
           "ray_modules", "standin_sampled"]

SAMPLING = ("grid_search", "uniform", "quniform", "loguniform", "qloguniform", "randn", "qrandn",
            "randint", "qrandint", "lograndint", "qlograndint", "choice", "sample_from")


class _Rng:
    """One interface over numpy's legacy RandomState (what sweeper passes) and its Generator."""

    def __init__(self, random_state: Any):
        self.state = random_state if random_state is not None else np.random
        self.legacy = not isinstance(random_state, np.random.Generator)

    def uniform(self, low: float, high: float, size: int) -> np.ndarray:
        return self.state.uniform(low, high, size=size)

    def normal(self, mean: float, sd: float, size: int) -> np.ndarray:
        return self.state.normal(mean, sd, size=size)

    def integers(self, low: int, high: int, size: int) -> np.ndarray:
        draw = self.state.randint if self.legacy else self.state.integers
        return draw(low, high, size=size)

    def choice(self, n: int, size: int) -> np.ndarray:
        return self.state.choice(np.arange(0, n), size=size)


# ---- samplers: what a domain draws with -------------------------------------------------------------

class Sampler:
    def __str__(self) -> str:
        return type(self).__name__


class Uniform(Sampler):
    def draw(self, domain: "Domain", rng: _Rng, size: int) -> np.ndarray:
        if isinstance(domain, Integer):
            return rng.integers(domain.lower, domain.upper, size)
        return rng.uniform(domain.lower, domain.upper, size)


class LogUniform(Sampler):
    def draw(self, domain: "Domain", rng: _Rng, size: int) -> np.ndarray:
        values = np.exp(rng.uniform(np.log(domain.lower), np.log(domain.upper), size))
        return np.floor(values).astype(int) if isinstance(domain, Integer) else values


class Normal(Sampler):
    def __init__(self, mean: float = 0.0, sd: float = 0.0):
        # Ray checks this with an assert (AssertionError, same words); a ValueError here is the
        # stand-in's kind of refusal, and the loading error names the file's line either way.
        if not sd > 0:
            raise ValueError("SD has to be strictly greater than 0")
        self.mean, self.sd = mean, sd

    def draw(self, domain: "Domain", rng: _Rng, size: int) -> np.ndarray:
        return rng.normal(self.mean, self.sd, size)


class Quantized(Sampler):
    """Draws on the multiples of ``q`` inside the bounds (an Integer's grid points evenly)."""

    def __init__(self, sampler: Sampler, q: float):
        self.sampler, self.q = sampler, q

    def get_sampler(self) -> Sampler:
        return self.sampler

    def _index(self, bound: float, rounding: Callable[[float], float]) -> float:
        # A bound's position on the grid of multiples of q, rounded inwards; infinite bounds
        # (randn's) stay as they are.
        if not np.isfinite(bound):
            return bound
        scaled = bound / self.q
        nearest = round(scaled)
        return nearest if math.isclose(scaled, nearest) else rounding(scaled)

    def draw(self, domain: "Domain", rng: _Rng, size: int) -> np.ndarray:
        inner = domain._copy()
        if isinstance(domain, Integer):
            lower, upper = int(self._index(domain.lower, np.ceil)), int(self._index(domain.upper, np.floor))
            if upper < lower:
                raise ValueError(f"There is no multiple of the quantization factor q={self.q} between "
                                 f"the bounds {domain.lower} and {domain.upper} of this domain, so it "
                                 "has no values to sample.")
            # Integer draws exclude the upper bound, except with q == 1 (qrandint(a, b) includes b).
            inner.lower, inner.upper = lower, upper + (0 if self.q == 1 else 1)
            return np.multiply(self.sampler.draw(inner, rng, size), self.q)
        inner.lower = self._index(domain.lower, np.ceil) * self.q
        inner.upper = self._index(domain.upper, np.floor) * self.q
        return np.round(np.divide(self.sampler.draw(inner, rng, size), self.q)) * self.q


class Grid(Sampler):
    pass


class _CallSampler(Sampler):
    """sample_from's: calls the function (Function draws itself)."""


# ---- domains ---------------------------------------------------------------------------------------

class Domain:
    sampler: Sampler | None = None
    default_sampler_cls: type = Uniform

    def cast(self, value: Any) -> Any:
        return value

    def get_sampler(self) -> Sampler:
        return self.sampler or self.default_sampler_cls()

    def _copy(self) -> "Domain":
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def _with(self, sampler: Sampler) -> "Domain":
        new = self._copy()
        new.sampler = sampler
        return new

    def sample(self, config: Any = None, size: int = 1, random_state: Any = None) -> Any:
        items = self._draw(config, size, _Rng(random_state))
        return items if len(items) > 1 else self.cast(items[0])

    def _draw(self, config: Any, size: int, rng: _Rng) -> Sequence[Any]:
        return self.get_sampler().draw(self, rng, size)

    def is_grid(self) -> bool:
        return isinstance(self.sampler, Grid)

    def is_function(self) -> bool:
        return False


class Float(Domain):
    def __init__(self, lower: float | None, upper: float | None):
        self.lower = lower if lower is not None else float("-inf")
        self.upper = upper if upper is not None else float("inf")

    def cast(self, value: Any) -> float:
        return float(value)

    def _quantized(self, q: float) -> "Float":
        for which, bound in (("lower", self.lower), ("upper", self.upper)):
            if math.isfinite(bound) and not math.isclose(bound / q, round(bound / q)):
                raise ValueError(f"Your {which} variable bound {bound} is not divisible by "
                                 f"quantization factor {q}.")
        return self._with(Quantized(self.get_sampler(), q))

    def _uniform(self) -> "Float":
        for which, ok in (("lower", self.lower > float("-inf")), ("upper", self.upper < float("inf"))):
            if not ok:
                raise ValueError(f"Uniform requires a {which} bound.")
        return self._with(Uniform())

    def _loguniform(self) -> "Float":
        if not self.lower > 0:
            raise ValueError(f"LogUniform requires a lower bound greater than 0. Got: {self.lower}.")
        if not 0 < self.upper < float("inf"):
            raise ValueError(f"LogUniform requires a upper bound greater than 0. Got: {self.upper}.")
        return self._with(LogUniform())


class Integer(Domain):
    def __init__(self, lower: int, upper: int):
        self.lower, self.upper = lower, upper

    def cast(self, value: Any) -> int:
        return int(value)

    def _quantized(self, q: int) -> "Integer":
        return self._with(Quantized(self.get_sampler(), q))

    def _loguniform(self) -> "Integer":
        return Float._loguniform(self)  # the same bound checks  # type: ignore[arg-type]


class Categorical(Domain):
    def __init__(self, categories: Sequence[Any]):
        self.categories = list(categories)

    def _draw(self, config: Any, size: int, rng: _Rng) -> Sequence[Any]:
        # By index, as Ray does: numpy's choice over the values themselves would coerce their types.
        return [self.categories[i] for i in rng.choice(len(self.categories), size)]

    def __len__(self) -> int:
        return len(self.categories)

    def __getitem__(self, item: Any) -> Any:
        return self.categories[item]


class Function(Domain):
    default_sampler_cls = _CallSampler

    def __init__(self, func: Callable[..., Any]):
        signature = inspect.signature(func)
        try:
            signature.bind({})
            self.pass_config = True
        except TypeError:
            self.pass_config = False
            try:
                signature.bind()
            except TypeError as exc:
                raise ValueError("The function passed to a `Function` parameter must be callable with "
                                 "either 0 or 1 parameters.") from exc
        self.func = func

    def _draw(self, config: Any, size: int, rng: _Rng) -> Sequence[Any]:
        if not self.pass_config:
            return [self.func() for _ in range(size)]
        return [self.func(config[i] if isinstance(config, list) else config) for i in range(size)]

    def is_function(self) -> bool:
        return True


# ---- the tune functions a space file calls ---------------------------------------------------------

def grid_search(values: Sequence[Any]) -> dict[str, Any]:
    return {"grid_search": values}


def uniform(lower: float, upper: float) -> Float:
    return Float(lower, upper)._uniform()


def quniform(lower: float, upper: float, q: float) -> Float:
    return Float(lower, upper)._uniform()._quantized(q)


def loguniform(lower: float, upper: float, base: Any = None) -> Float:
    return Float(lower, upper)._loguniform()


def qloguniform(lower: float, upper: float, q: float, base: Any = None) -> Float:
    return Float(lower, upper)._loguniform()._quantized(q)


def randn(mean: float = 0.0, sd: float = 1.0) -> Float:
    return Float(None, None)._with(Normal(mean, sd))


def qrandn(mean: float, sd: float, q: float) -> Float:
    return randn(mean, sd)._quantized(q)


def randint(lower: int, upper: int) -> Integer:
    return Integer(lower, upper)._with(Uniform())


def qrandint(lower: int, upper: int, q: int = 1) -> Integer:
    return randint(lower, upper)._quantized(q)


def lograndint(lower: int, upper: int, base: Any = None) -> Integer:
    return Integer(lower, upper)._loguniform()


def qlograndint(lower: int, upper: int, q: int, base: Any = None) -> Integer:
    return lograndint(lower, upper)._quantized(q)


def choice(categories: Sequence[Any]) -> Categorical:
    return Categorical(categories)._with(Uniform())


def sample_from(func: Callable[..., Any]) -> Function:
    return Function(func)


# ---- the modules loading puts in sys.modules -------------------------------------------------------

def _needs_ray(module: str) -> Callable[[str], Any]:
    def missing(name: str) -> Any:
        if name.startswith("__") and name != "__version__":  # Python's own probes (__path__, ...)
            raise AttributeError(name)
        raise AttributeError(
            f"{module}.{name} needs Ray, which is not installed in this Python ({sys.executable}); "
            f"without Ray a search-space file may use only ray.tune's {', '.join(SAMPLING)} "
            "(pip install 'ray[tune]' for the rest)")
    return missing


def ray_modules() -> dict[str, types.ModuleType]:
    """Fresh ``ray`` and ``ray.tune`` modules for ``sys.modules`` while a space file runs."""
    tune = types.ModuleType("ray.tune", "sweeper's stand-in for ray.tune's sampling functions")
    for name in SAMPLING:
        setattr(tune, name, globals()[name])
    tune.__getattr__ = _needs_ray("ray.tune")  # type: ignore[attr-defined]
    ray = types.ModuleType("ray", "sweeper's stand-in: Ray is not installed in this Python")
    ray.__path__ = []  # a package, so `import ray.tune` and `from ray import tune` both resolve
    ray.tune = tune  # type: ignore[attr-defined]
    ray.__getattr__ = _needs_ray("ray")  # type: ignore[attr-defined]
    return {"ray": ray, "ray.tune": tune}


def standin_sampled(space: Any) -> bool:
    """Whether any value of a space is one of these domains (the file was loaded without Ray)."""
    return any(isinstance(value, Domain) for value in dict(space).values())
