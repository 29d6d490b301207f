"""Tune domains in a space: stable text for each, and the checks each must pass under its search.

Ray Tune's domains are recognised by their duck type (no Ray import here: ``sweeper debug`` runs
wherever torch does). :func:`describe_domain` gives text that is the same in every process (no memory
addresses), used in plans, the sweep record and :func:`space_signature`, which binds a sweep name to
its space. :func:`_domain_problems` checks a domain under the search algorithm that will sample it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping


if TYPE_CHECKING:
    from sweeper.spaces import Sweep

__all__ = ["describe_domain", "space_signature"]

def _is_grid(value: Any) -> bool:
    return isinstance(value, Mapping) and set(value) == {"grid_search"}


def _is_domain(value: Any) -> bool:
    # Ray Tune's Domain classes (Categorical, Float, Integer, Function) all expose .sample().
    return callable(getattr(value, "sample", None)) and not isinstance(value, type)


_OPTUNA_DOMAINS = ("tune.uniform, tune.quniform, tune.loguniform, tune.randint, tune.qrandint, "
                   "tune.lograndint or tune.choice")
_OPTUNA_CHOICE_TYPES = (bool, int, float, str)  # and None: what Optuna's storage can hold


@dataclass(frozen=True)
class _Domain:
    """What a Tune domain samples: kind 'float'/'int'/'choice'/'function' (else the class name),
    sampler 'uniform'/'loguniform'/'normal'/'grid'/'function' (else the sampler's class name)."""

    kind: str
    sampler: str
    q: Any = None  # quantisation step, None if not quantised
    lower: Any = None
    upper: Any = None
    mean: Any = None
    sd: Any = None
    categories: tuple = ()
    func: Any = None


def _domain(value: Any) -> _Domain:
    kinds = {"Float": "float", "Integer": "int", "Categorical": "choice", "Function": "function"}
    names = [c.__name__ for c in type(value).__mro__]
    kind = next((kinds[n] for n in names if n in kinds), type(value).__name__)
    try:
        sampler = value.get_sampler()
    except Exception:  # noqa: BLE001 -- a foreign domain: describe what we can
        sampler = getattr(value, "sampler", None)
    q = None
    if sampler is not None and hasattr(sampler, "q") and hasattr(sampler, "sampler"):  # Quantized
        q, sampler = sampler.q, sampler.sampler
    sampler_names = {c.__name__ for c in type(sampler).__mro__} if sampler is not None else set()
    for label in ("LogUniform", "Normal", "Uniform", "Grid"):
        if label in sampler_names:
            how = label.lower()
            break
    else:
        how = "function" if kind == "function" else type(sampler).__name__.lstrip("_").lower()
    categories = tuple(getattr(value, "categories", ()) or ()) if kind == "choice" else ()
    return _Domain(kind=kind, sampler=how, q=q, lower=getattr(value, "lower", None),
                   upper=getattr(value, "upper", None), mean=getattr(sampler, "mean", None),
                   sd=getattr(sampler, "sd", None), categories=categories,
                   func=getattr(value, "func", None))


_ADDRESS_RE = re.compile(r" at 0x[0-9a-fA-F]+")


def _text(value: Any) -> str:
    """repr, with numpy scalars as Python numbers and memory addresses dropped (stable across runs)."""
    if isinstance(value, list):
        return "[" + ", ".join(_text(v) for v in value) + "]"
    if isinstance(value, tuple):
        return "(" + ", ".join(_text(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        value = value.item()
    return _ADDRESS_RE.sub("", repr(value))


def describe_domain(value: Any) -> str:
    """Readable, stable text for any space value: ``loguniform(0.001, 0.1)``, ``randint(1, 5)``,
    ``choice(['a', 'b'])``, ``grid_search([11, 13])``, ``qrandint(8, 64, 8)``, ``randn(0.0, 1.0)``;
    a plain value as its repr. Equal values give equal texts in every process."""
    if _is_grid(value):
        values = value["grid_search"]
        return f"grid_search({_text(list(values) if isinstance(values, tuple) else values)})"
    if not _is_domain(value):
        return _text(value)
    d = _domain(value)
    q = "" if d.q is None else f", {_text(d.q)}"
    prefix = "" if d.q is None else "q"
    bounds = f"{_text(d.lower)}, {_text(d.upper)}"
    if d.kind == "float" and d.sampler == "uniform":
        return f"{prefix}uniform({bounds}{q})"
    if d.kind == "float" and d.sampler == "loguniform":
        return f"{prefix}loguniform({bounds}{q})"
    if d.kind == "float" and d.sampler == "normal":
        return f"{prefix}randn({_text(d.mean)}, {_text(d.sd)}{q})"
    if d.kind == "int" and d.sampler == "uniform":
        return f"{prefix}randint({bounds}{q})"
    if d.kind == "int" and d.sampler == "loguniform":
        return f"{prefix}lograndint({bounds}{q})"
    if d.kind == "choice":
        text = f"choice({_text(list(d.categories))})"
        return text if d.sampler == "uniform" else f"{text}.{d.sampler}()"
    if d.kind == "function":
        code = getattr(d.func, "__code__", None)
        where = f" at {Path(code.co_filename).name}:{code.co_firstlineno}" if code else ""
        return f"sample_from({getattr(d.func, '__qualname__', _text(d.func))}{where})"
    return _ADDRESS_RE.sub("", f"{type(value).__name__}({d.sampler}"
                               f"{', ' + bounds if d.lower is not None else ''}{q})")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) or (
        type(x).__module__ == "numpy" and hasattr(x, "item")
        and isinstance(x.item(), (int, float)) and not isinstance(x.item(), bool))


def _domain_problems(key: str, value: Any, search: str) -> list[str]:
    """What is wrong with one space entry under the search algorithm that will sample it."""
    where = f"space[{key!r}]"
    if _is_grid(value):
        values = value["grid_search"]
        if not isinstance(values, (list, tuple)) or not values:
            return [f"{where}=grid_search({_text(values)}) needs a non-empty list of values, e.g. "
                    "tune.grid_search([11, 13, 16])"]
        return []
    if not _is_domain(value):
        return []
    text = describe_domain(value)
    if key == "model.init_from" and any(isinstance(c, str) and c.startswith("sweep:")
                                        for c in getattr(value, "categories", []) or []):
        # The launch resolves each reference once, before Ray starts: a sampled one never would be.
        return [f"{where}={text}: a sweep reference (sweep:NAME/REF) must be a fixed value or a "
                "tune.grid_search value, which the launch resolves before Ray starts"]
    d = _domain(value)
    if d.kind == "function":
        if search == "optuna":
            return [f"{where}={text}: search='optuna' cannot convert tune.sample_from (Ray's "
                    f"OptunaSearch takes only {_OPTUNA_DOMAINS})"]
        return [f"{where}={text}: tune.sample_from cannot be checked before the sweep starts (nor "
                "searched by Optuna): use tune.choice / tune.loguniform / tune.grid_search"]
    if d.kind == "choice":
        if not d.categories:
            return [f"{where}=choice([]) has nothing to choose from: give at least one value, "
                    "e.g. tune.choice(['he', 'xavier'])"]
        if d.sampler != "uniform":
            return [f"{where}={text}: a choice must sample uniformly (tune.choice); for every value "
                    "in turn use tune.grid_search([...])"]
        if search == "optuna":
            bad = [c for c in d.categories if c is not None and not isinstance(c, _OPTUNA_CHOICE_TYPES)]
            if bad:
                return [f"{where}={text}: search='optuna' can store only None, bool, int, float or "
                        f"str choices, not {type(bad[0]).__name__} {_text(bad[0])}: choose among "
                        "names or numbers"]
        return []
    if d.kind not in ("float", "int"):
        if search == "optuna":
            return [f"{where}={text}: search='optuna' cannot convert a {type(value).__name__} domain "
                    f"(Ray's OptunaSearch takes only {_OPTUNA_DOMAINS})"]
        return []
    p: list[str] = []
    if d.q is not None and (not _is_number(d.q) or not d.q > 0):
        p.append(f"{where}={text}: the quantisation step q={_text(d.q)} must be a number > 0")
    if d.sampler == "normal":
        if not (_is_number(d.sd) and d.sd > 0 and _is_number(d.mean) and math.isfinite(d.mean)):
            p.append(f"{where}={text}: randn needs a finite mean and sd > 0")
        if search == "optuna":
            p.append(f"{where}={text}: search='optuna' cannot sample a normal distribution (Ray's "
                     f"OptunaSearch takes only {_OPTUNA_DOMAINS}): use tune.uniform or "
                     "tune.loguniform, or search='random'")
        return p
    if d.sampler not in ("uniform", "loguniform"):
        return p + [f"{where}={text}: unsupported sampler {d.sampler!r}"]
    lo, hi = d.lower, d.upper
    if not (_is_number(lo) and _is_number(hi) and math.isfinite(lo) and math.isfinite(hi)):
        return p + [f"{where}={text}: bounds must be finite numbers, e.g. "
                    f"{'tune.randint(1, 5)' if d.kind == 'int' else 'tune.uniform(0.0, 0.5)'}"]
    name = text.partition("(")[0]
    if d.sampler == "loguniform" and not lo > 0:
        p.append(f"{where}={text}: a log scale needs 0 < lower < upper, got lower={_text(lo)}")
    if not lo < hi:
        swap = f" (swap them: {name}({_text(hi)}, {_text(lo)}{'' if d.q is None else ', ' + _text(d.q)}))" \
            if lo > hi else ""
        exclusive = "; randint's upper bound is exclusive: randint(1, 5) draws 1 to 4" \
            if d.kind == "int" and d.q is None else ""
        p.append(f"{where}={text} needs lower < upper, got lower={_text(lo)} "
                 f"{'>' if lo > hi else '='} upper={_text(hi)}{swap}{exclusive}")
    elif d.kind == "int" and d.q is not None and _is_number(d.q) and d.q > 0 \
            and math.floor(hi / d.q) < math.ceil(lo / d.q):
        p.append(f"{where}={text} has no multiple of q={_text(d.q)} between {_text(lo)} and "
                 f"{_text(hi)}, so nothing to sample")
    if search == "optuna" and d.q is not None and d.sampler == "loguniform":
        if d.kind == "float":
            p.append(f"{where}={text}: search='optuna' drops the step q={_text(d.q)} of a log-uniform "
                     f"domain (Ray's OptunaSearch ignores it): use tune.loguniform({_text(lo)}, "
                     f"{_text(hi)}), or search='random'")
        elif d.q != 1:
            p.append(f"{where}={text}: search='optuna' cannot step a log-scaled integer (Optuna "
                     f"allows log only with step 1): use tune.lograndint({_text(lo)}, {_text(hi)}) or "
                     f"tune.qrandint({_text(lo)}, {_text(hi)}, {_text(d.q)})")
    return p


def space_signature(sweep: Sweep) -> dict[str, str]:
    """Everything that decides which trials a sweep runs, as sorted ``{name: text}`` (JSON-ready).

    Space keys map to :func:`describe_domain` texts; the Sweep's settings appear as ``sweep.<field>``
    (metric, mode, max_epochs, scheduler, prune_within, grace_period, reduction_factor, search,
    num_samples, seed),
    and ``sweep.space_order`` lists the keys in order (it decides grid order and which value each
    draw of the seeded sampler goes to). Two loads of one file give equal signatures; any change of a
    key or a value changes it."""
    out = {str(k): describe_domain(v) for k, v in sweep.space.items()}
    for name in ("metric", "mode", "max_epochs", "scheduler", "prune_within", "grace_period",
                 "reduction_factor", "search", "num_samples", "seeds", "seed"):
        out[f"sweep.{name}"] = _text(getattr(sweep, name))
    out["sweep.space_order"] = _text([str(k) for k in sweep.space])
    return dict(sorted(out.items()))
