"""One trial's training loop, in plain PyTorch (no Ray, no MLflow: it must run anywhere torch does).

``fit(cfg, report=...)`` builds data, model, optimizer and LR schedule from a validated
:class:`~sweeper.config.TrialConfig`, trains for ``cfg.epochs`` epochs and calls ``report`` once per
epoch -- one epoch is one Tune iteration, one ASHA step and one MLflow step. The caller decides what a
report does (print a table, ``tune.report`` with a checkpoint, ...); ``fit`` hands it a ``save``
function that writes a complete checkpoint (model, optimizer, scheduler, RNG states, epoch, history)
into a directory, and :func:`fit` with ``resume_from=`` continues from one with the same result as an
uninterrupted run.

Every trial ends with an outcome: ``completed``; ``diverged`` (a non-finite loss: the trial stops and
says so instead of raising and killing a sweep); or whatever a hook decides (``stalled``).

On CUDA a training or evaluation step never makes the host wait for the device: the epoch's random
draws reach the device in one non-blocking copy (see :mod:`sweeper.data.device`), and loss and accuracy
are summed on the device and read once per epoch, after the epoch's last step has been queued.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import nn

from sweeper.config import ConfigError, TrialConfig
from sweeper.data import DeviceData, Splits, load_splits
from sweeper.models import build_model, split_outputs
from sweeper.transfer import apply_transfer, input_normalization

__all__ = [
    "CHECKPOINT_FILE",
    "INIT_PREFIX",
    "FitResult",
    "Hook",
    "Report",
    "TrainContext",
    "evaluate",
    "fit",
    "resolve_device",
    "train_step",
]

CHECKPOINT_FILE = "trial_state.pt"
# The first epoch's report also carries the step-0 measurements under this prefix, so that a tracker
# can log them at step 0 (before any update) without a second kind of report.
INIT_PREFIX = "init/"

# report(metrics, save): save(directory) writes a checkpoint of the state after this epoch.
Report = Callable[[dict[str, Any], Callable[[Path], None]], None]


@dataclass
class TrainContext:
    """What hooks may look at (and ``stop``) while a trial trains."""

    cfg: TrialConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    data: DeviceData
    device: torch.device
    criterion: nn.Module
    epoch: int = 0  # epochs completed
    history: list[dict[str, Any]] = field(default_factory=list)
    # A hook's verdict on the trial so far, e.g. ("stalled", "vanishing_signal"): the outcome if
    # training ended now. With stop=True training ends after this epoch with that outcome.
    label: tuple[str, str] | None = None
    stop: bool = False


class Hook(Protocol):
    """Extra per-epoch measurements (e.g. diagnostics). Returned metrics join the epoch's report."""

    def on_fit_start(self, ctx: TrainContext) -> dict[str, Any]: ...

    def on_epoch_end(self, ctx: TrainContext, metrics: dict[str, Any]) -> dict[str, Any]: ...

    # Optional: ``watch_step(ctx, y) -> context manager | None``. Called before the epoch's last
    # full-size training step (its labels ``y``); a context it returns is entered around that step.
    # Not called under compile (an eager step there would not be bit-identical to a compiled one).

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class FitResult:
    outcome: str  # completed | diverged | stalled | ...
    reason: str | None
    epochs: int
    history: list[dict[str, Any]]
    initial: dict[str, Any]  # metrics measured before the first step (step 0)

    @property
    def last(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        # A setting the user can change: `sweeper debug` says so in one line (exit 2).
        raise ConfigError([f"device={name!r} was asked for, but torch sees no CUDA device "
                           "(use device=auto or device=cpu)"])
    return device


def fit(
    cfg: TrialConfig,
    *,
    report: Report | None = None,
    resume_from: str | Path | None = None,
    hooks: Sequence[Hook] = (),
    splits: Splits | None = None,
) -> FitResult:
    """Train one trial; see the module docstring. ``splits`` skips loading (tests, benchmarks)."""
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        # Stalled deep nets produce denormal floats, which make CPU arithmetic ~10x slower.
        torch.set_flush_denormal(True)
    with _backend_flags(deterministic=cfg.deterministic, on_cuda=device.type == "cuda"):
        return _fit(cfg, device, report=report, resume_from=resume_from, hooks=hooks, splits=splits)


def _fit(cfg: TrialConfig, device: torch.device, *, report: Report | None,
         resume_from: str | Path | None, hooks: Sequence[Hook], splits: Splits | None) -> FitResult:
    on_cuda = device.type == "cuda"
    if splits is None:
        splits = load_splits(cfg.data, seed=cfg.seed)
    channels_last = on_cuda and cfg.channels_last
    data = DeviceData(splits, cfg.data, device=device, channels_last=channels_last,
                      normalize=input_normalization(cfg))  # pretrained weights' mean/std, else None

    torch.manual_seed(cfg.seed)  # the init draws from the global generator
    model = build_model(cfg.model, num_classes=data.num_classes)
    # model.pretrained / init_from / freeze (sweeper.transfer): on the CPU, before the optimizer sees
    # the parameters (frozen ones are left out of it); draws no random numbers.
    transfer = apply_transfer(model, cfg.model)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    # The steps and evaluations run `net`; hooks, checkpoints and the step-0 probe see `model` itself
    # (same parameters, its own module names and state-dict keys, forward hooks that fire eagerly).
    net = _compiled(model, cfg.compile) if cfg.compile else model
    optimizer = _optimizer(cfg, model)
    scheduler = _scheduler(cfg, optimizer)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    batch_gen = torch.Generator().manual_seed(cfg.seed + 1)  # shuffling and augmentation
    autocast = _autocast(cfg, device)

    ctx = TrainContext(cfg=cfg, model=model, optimizer=optimizer, data=data, device=device,
                       criterion=criterion)
    initial: dict[str, Any] = {}
    if resume_from is not None:
        state = torch.load(Path(resume_from) / CHECKPOINT_FILE, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        # Generator states are CPU byte tensors whatever the device: map_location moved them onto
        # the GPU with the weights, and set_state refused them (every GPU trial's resume failed).
        batch_gen.set_state(state["batch_gen"].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())
        if on_cuda and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
        ctx.epoch, ctx.history, initial = state["epoch"], state["history"], state["initial"]
        for hook, hook_state in zip(hooks, state["hooks"]):
            hook.load_state_dict(hook_state)
    else:
        initial = {"initial_loss": _probe_loss(ctx, autocast)}
        if transfer.source is not None or transfer.frozen:
            initial.update(transfer.metrics())  # init/transfer_tensors, init/frozen_tensors
        for hook in hooks:
            initial.update(hook.on_fit_start(ctx))

    def save(directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        torch.save({
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "batch_gen": batch_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if on_cuda else None,
            "epoch": ctx.epoch,
            "history": ctx.history,
            "initial": initial,
            "hooks": [hook.state_dict() for hook in hooks],
            "config": cfg.to_flat(),
        }, directory / CHECKPOINT_FILE)

    outcome, reason = "completed", None
    if ctx.history and ctx.history[-1]["outcome"] != "running":  # resumed a finished trial
        outcome = ctx.history[-1]["outcome"]
    while ctx.epoch < cfg.epochs and outcome == "completed":
        lr = optimizer.param_groups[0]["lr"]
        if on_cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        totals = _train_epoch(ctx, batch_gen, autocast, net, hooks)
        if on_cuda:
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        gpu_busy = _gpu_utilization(device) if on_cuda else None  # NVML's last sample: the epoch's end
        train = _summarise(totals)  # the epoch's one read of the training sums
        ctx.epoch += 1
        # ln C: the loss of a net that has learned nothing (outcomes measure "at chance" against it).
        metrics: dict[str, Any] = {"epoch": ctx.epoch, "lr": lr,
                                   "chance_loss": math.log(data.num_classes)}
        metrics.update({f"train_{k}": v for k, v in train.items()})
        metrics["epoch_seconds"] = seconds
        metrics["images_per_second"] = train["examples"] / seconds if seconds > 0 else float("nan")
        del metrics["train_examples"]

        if not math.isfinite(train["loss"]):
            outcome, reason = "diverged", f"non-finite training loss in epoch {ctx.epoch}"
        else:
            val = evaluate(net, data.eval_batches("val"), criterion, autocast)
            metrics.update({f"val_{k}": v for k, v in val.items()})
            for hook in hooks:
                metrics.update(hook.on_epoch_end(ctx, metrics))
            if ctx.stop and ctx.label is not None:
                outcome, reason = ctx.label
            elif scheduler is not None:
                if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    scheduler.step(metrics["val_accuracy"])
                else:
                    scheduler.step()
        if outcome == "completed" and ctx.epoch == cfg.epochs:
            test = evaluate(net, data.eval_batches("test"), criterion, autocast)
            metrics.update({f"test_{k}": v for k, v in test.items()})
            if cfg.data.test_scales is not None:  # VGG's multi-crop test: views' posteriors averaged
                from sweeper.data.views import multicrop_evaluate

                multi = multicrop_evaluate(net, data, "test", autocast=autocast)
                metrics["test_views"] = multi.pop("views")
                metrics.update({f"test_multicrop_{k}": v for k, v in multi.items()})
        if on_cuda:
            # What a fractional-GPU trial must fit: the epoch's peak, training and evaluation included.
            metrics["gpu_memory_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            if gpu_busy is not None:
                metrics["gpu_utilization"] = gpu_busy
        finished = outcome != "completed" or ctx.epoch == cfg.epochs
        if finished and outcome == "completed" and ctx.label is not None:
            outcome, reason = ctx.label  # ran its budget, but e.g. stalled at chance throughout
        metrics["outcome"] = outcome if finished else "running"
        if reason:
            metrics["stop_reason"] = reason
        ctx.history.append(metrics)
        if report is not None:
            if ctx.epoch == 1:
                metrics = {**metrics, **{INIT_PREFIX + k: v for k, v in initial.items()}}
            report(metrics, save)
    return FitResult(outcome=outcome, reason=reason, epochs=ctx.epoch, history=list(ctx.history),
                     initial=initial)


def evaluate(model: nn.Module, batches, criterion: nn.Module,
             autocast: Callable[[], Any] = contextlib.nullcontext) -> dict[str, float]:
    """Loss, accuracy and top-1/top-5 error over batches; sums stay on the device until the end."""
    return _summarise(_eval_totals(model, batches, criterion, autocast))


# ---- internals --------------------------------------------------------------------------------------


def _train_epoch(ctx: TrainContext, gen: torch.Generator, autocast,
                 net: nn.Module | None = None, hooks: Sequence[Hook] = ()) -> "_Totals | None":
    """One epoch of steps; returns its sums, still on the device (None if no step ran). Nothing
    here reads a device value on the host: no .item(), no branch on a tensor -- except inside the
    one step per epoch a hook watches (``watch_step``), whose statistics it reads as they arise."""
    model, optimizer, criterion = ctx.model, ctx.optimizer, ctx.criterion
    net = model if net is None else net
    aux_weight = ctx.cfg.model.aux_weight
    # Under compile the watched step would run on the eager model, whose floats round differently
    # from the compiled net's: the trajectory would change, so compiled runs keep the hooks' probe.
    watchers = [h for h in hooks if hasattr(h, "watch_step")] if net is model else []
    # The last full-size step: a short last batch would give the hooks fewer examples to measure.
    watched = ctx.data.last_full_step if watchers else -1
    model.train()
    totals = _Totals()
    for i, (x, y) in enumerate(ctx.data.train_batches(gen)):
        if i == watched:
            with contextlib.ExitStack() as stack:
                watches = [w for hook in watchers if (w := hook.watch_step(ctx, y)) is not None]
                for watch in watches:
                    stack.enter_context(watch)
                logits, loss = train_step(model if watches else net, optimizer, criterion, x, y,
                                          aux_weight=aux_weight, autocast=autocast)
        else:
            logits, loss = train_step(net, optimizer, criterion, x, y, aux_weight=aux_weight,
                                      autocast=autocast)
        # No .item() here: a host-device sync per step costs more than a small net's step on a GPU.
        totals.add(logits.detach(), y, loss.detach())
    return totals if totals.n else None


def _eval_totals(model: nn.Module, batches, criterion: nn.Module, autocast) -> "_Totals | None":
    """The sums over batches, on the device; like a training step, no host read."""
    was_training = model.training
    model.eval()
    totals = _Totals()
    with torch.no_grad():
        for x, y in batches:
            with autocast():
                logits = split_outputs(model(x))[0]
                loss = criterion(logits.float(), y)
            totals.add(logits, y, loss)
    model.train(was_training)
    return totals if totals.n else None


def train_step(net: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module,
               x: torch.Tensor, y: torch.Tensor, *, aux_weight: float = 0.0,
               autocast: Callable[[], Any] = contextlib.nullcontext):
    """One optimizer step; (logits, main loss), both still on the device.

    GoogLeNet's auxiliary heads add ``aux_weight`` times their losses to what is minimised, as in
    the paper; the loss reported is the main head's.
    """
    with autocast():
        logits, aux = split_outputs(net(x))
        loss = criterion(logits.float(), y)
        total = loss + aux_weight * sum(criterion(a.float(), y) for a in aux) if aux else loss
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    return logits, loss


class _Totals:
    """A pass's loss and top-1/top-k hits, summed on the device without a host read.

    The example count is the host's: batch sizes are Python ints. Per batch that is 6 small kernels
    (top-k, compare, one reduction, the loss scaled and added, the hits added), half what stacking
    [n, loss*n, top1, top5] per batch launched; on a GPU a small net's step is launch-bound, and
    those per-step sums were measured at ~4% of a VGG-16 epoch (bench/README.md)."""

    __slots__ = ("n", "loss", "hits")

    def __init__(self) -> None:
        self.n = 0
        self.loss: torch.Tensor | None = None  # sum of loss * batch size, float32
        self.hits: torch.Tensor | None = None  # [k] examples whose label is the model's rank-i guess

    def add(self, logits: torch.Tensor, y: torch.Tensor, loss: torch.Tensor) -> None:
        n = y.shape[0]
        k = min(5, logits.shape[1])
        # top-k's indices are distinct, so an example hits at most one rank: per-rank counts give
        # top-1 (rank 0) and top-k (their sum) from one reduction.
        hits = (logits.topk(k, dim=1).indices == y[:, None]).sum(dim=0)
        scaled = loss.float() * n
        if self.loss is None:
            self.loss, self.hits = scaled, hits
        else:
            self.loss.add_(scaled)
            self.hits.add_(hits)
        self.n += n

    def read(self) -> tuple[int, float, int, int]:
        """(n, loss sum, top-1 hits, top-k hits): the one host read of the pass."""
        loss, *hits = torch.cat([self.loss.double().reshape(1), self.hits.double()]).tolist()
        return self.n, loss, int(hits[0]), int(sum(hits))


def _summarise(totals: _Totals | None) -> dict[str, float]:
    if totals is None:
        return {"loss": float("nan"), "accuracy": float("nan"), "top1_error": float("nan"),
                "top5_error": float("nan"), "examples": 0}
    n, loss_sum, top1, top5 = totals.read()
    return {"loss": loss_sum / n, "accuracy": top1 / n, "top1_error": 1 - top1 / n,
            "top5_error": 1 - top5 / n, "examples": int(n)}


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _probe_loss(ctx: TrainContext, autocast) -> float:
    """Training loss on the fixed probe batch before any step: ln(C) for a net that outputs nothing.

    BatchNorm normalises with the batch's statistics, as the first training step does: in eval mode
    its untouched running statistics (mean 0, variance 1) make it an identity, and a BN net's "loss
    at step 0" was its plain twin's (2.3026 for a Xavier VGG-19 with BN, whose first step saw 3.79).
    Dropout stays off, so the number draws no randomness; the running statistics are put back."""
    x, y = ctx.data.probe_batch(ctx.cfg.diagnostics.probe_size)
    model = ctx.model
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    model.eval()
    for m in model.modules():
        if isinstance(m, _BATCH_NORMS):
            m.train()
    try:
        with torch.no_grad(), autocast():
            logits = split_outputs(model(x))[0]
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        model.train()
    return float(ctx.criterion(logits.float(), y))


def _optimizer(cfg: TrialConfig, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    # Frozen parameters (model.freeze) never reach the optimizer: no decay, no momentum, no update.
    trainable = [p for p in model.parameters() if p.requires_grad]
    if o.decay_norm_bias:
        params: Any = trainable  # one group: weight decay on every parameter (the VGG recipe)
    else:
        # Decay only conv/linear weights: norm scales and shifts and biases are 1-D, and shrinking them
        # towards 0 fights BatchNorm's rescaling instead of regularising.
        no_decay = [p for p in trainable if p.ndim <= 1]
        decay = [p for p in trainable if p.ndim > 1]
        params = [{"params": decay}] + ([{"params": no_decay, "weight_decay": 0.0}] if no_decay else [])
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)


def _scheduler(cfg: TrialConfig, optimizer: torch.optim.Optimizer):
    o = cfg.optim
    if o.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=o.gamma, patience=o.plateau_patience)
    if o.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    if o.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=o.step_size, gamma=o.gamma)
    return None


def _compiled(model: nn.Module, mode: bool | str = True) -> nn.Module:
    """``torch.compile(model)``: the wrapper shares the model's parameters and buffers.

    ``"reduce-overhead"`` records a CUDA graph per batch shape and replays it. Its shapes are static
    (``dynamic=False``): a batch size made dynamic would need a graph per size anyway. Each graph
    reuses its output buffers, so a step's logits and loss are read (the epoch sums) before the next
    step runs, as the loops here do.
    """
    if mode == "reduce-overhead":
        return torch.compile(model, mode="reduce-overhead", dynamic=False)
    return torch.compile(model)


@contextlib.contextmanager
def _backend_flags(*, deterministic: bool, on_cuda: bool):
    """cudnn.benchmark on CUDA unless deterministic; deterministic algorithms for this fit only.

    The previous global settings are restored on exit, so a deterministic trial leaves the process
    (a test session, a reused Ray worker) as it found it.
    """
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    if deterministic:
        # cuBLAS is deterministic only with a fixed workspace; read when the process's first cuBLAS
        # handle is made, so a worker that already ran a CUDA matmul keeps its old setting.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: an op with no deterministic CUDA kernel (the 'paper' head's AdaptiveAvgPool2d(7)
        # backward, GoogLeNet's auxiliary pools) warns by name instead of failing the trial mid-sweep;
        # such a run is not bit-identical, and the warning says why.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False  # autotuning may pick different kernels per run
    elif on_cuda:
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2], saved[3]


def _gpu_utilization(device: torch.device) -> float | None:
    """NVML's percent of its last sample period (1/6 s to 1 s) in which a kernel ran on this GPU --
    any process's, so trials sharing a card see the card's load. None without pynvml or NVML."""
    try:
        return float(torch.cuda.utilization(device))
    except Exception:  # ModuleNotFoundError (pynvml), NVML errors, MIG slices without the counter
        return None


def _autocast(cfg: TrialConfig, device: torch.device) -> Callable[[], Any]:
    """A context-manager factory: bf16 autocast on CUDA (no loss scaling needed), else nothing."""
    if device.type == "cuda" and cfg.amp:
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext
