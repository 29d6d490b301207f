"""Per-layer training health, and a named reason when a trial stalls. Plain PyTorch.

At init (step 0) :class:`Diagnostics` pushes one fixed probe batch forward and backward through the
model (train mode, as training sees it; auxiliary heads' losses weighted by ``model.aux_weight`` as
training weights them); for every epoch it records the epoch's last full-size training step as that
step runs (``diagnostics.epoch_probe='training_step'``, the default: :mod:`~sweeper.diagnostics.recorder`)
or runs the same probe pass again after the epoch (``'fixed'``). Either way it measures, for every conv
and linear layer, over ``probe_size`` examples:

  act_mean, act_std     the layer's output (pre-activation) -- the forward signal
  out_grad_std          std of dL/d(output) -- the backward signal
  zero_frac, dead_frac  of the ReLU that follows: zero outputs (~0.5 healthy) and units (channels) that
                        are zero for every probe example and position
  sensitivity           mean over units of (std across examples) / RMS: ~0 when the output ignores the input
  weight_norm, grad_norm, rel_grad = grad_norm / weight_norm
  update_ratio          ||W_after - W_before|| / ||W_before|| of one real optimizer step (momentum,
                        weight decay and Adam included; see :func:`last_step`)
  rel_change            ||W_now - W_epoch_start|| / ||W_epoch_start||: the whole epoch's displacement
  gain_meas             E[y^2] / E[x^2]: the layer's output y over its *own* input x, captured by a
                        forward hook, so pooling, BN, shortcuts and branches before it do not enter
  gain_pred             the same from theory: n E[w^2] rho + E[b^2] / E[x^2] (:func:`predicted_gain`),
                        rho weighted by where the real input's energy sits (:func:`padding_fraction`)
  gain_err              gain_meas / gain_pred - 1; ``gain_err_max`` is the largest |gain_err|

Step 0 also carries ``act_std_pred/<layer>``: He et al.'s output std predicted by propagating E[x^2]
analytically from the probe input through every module on the path (:func:`chain_second_moments`),
and ``act_std_err_max``, the largest factor between it and the measured std.

Layers are numbered in the order the network runs them in eval mode, its main path: ``l00_conv`` ...
``l10_fc``, the classifier last. Layers that run only in training (GoogLeNet's auxiliary heads) come
after, as ``a00_conv``, ``a01_fc``, ...: the main path's names are the same with and without them.

Glorot & Bengio's point is why rel_grad and update_ratio, not the first/last gradient ratio, are the
stall signal: with equal widths the weight gradients keep their ratio while every one of them vanishes.

A probe pass runs under a forked RNG with BatchNorm buffers restored, and a recorded step's hooks only
read, so diagnostics never change the training trajectory: a trial gives the same metrics with and
without them. A recorded epoch costs only its statistics (about a quarter of a step on a CPU; see
``measure``); a 'fixed' epoch adds the probe's forward and backward, about one training step; step 0
costs one probe pass and the layer discovery in both modes (issue #9: +3% against +7% on 21-step
epochs). What a recorded epoch measures is the step that trained the net: augmented training images,
the batch's own gradient (over the whole batch, so ``grad_norm`` carries less noise at larger
batches; ``out_grad_std`` is rescaled to a mean over the examples measured, as a probe's is) and
update, with everything taken from the pass (``rel_grad``, ``gain_pred`` included) at the weights
that step ran with; ``weight_norm`` and ``rel_change`` are the weights at the epoch's end. A 'fixed'
epoch compares epochs on the same unaugmented images. Under ``compile`` every epoch uses the probe
pass: a recorded step runs eagerly, and an eager step is not bit-identical to a compiled one.

Stall detection: ``stall_epochs`` epochs in a row no better than chance (training loss not below
ln(num_classes) - ``stall_tolerance``, validation accuracy not past 2x chance where measured:
:func:`sweeper.outcomes.no_better_than_chance`), or a trial that learned (an epoch's loss below
ln C - 2 x ``stall_tolerance``, and validation accuracy past 2x chance where measured) back in that
band or above it (``learn_then_collapse``); the cause is named from the measurements,
then checked by intervention the first time a stall is named (:mod:`sweeper.counterfactual`: lr / 10,
lr x 10, He init, BN in short runs): where the interventions decide it, the label carries their cause
(``stall_reason``; the measured one stays in ``stall_reason_measured``, the evidence in ``cf_evidence``).

Where each part lives:
  hook.py      :class:`Diagnostics`: when it measures (step 0, each epoch), the metrics it logs, when a
               stall is named and checked
  recorder.py  one pass measured per layer while it runs (a training step's or the probe's)
  stats.py     the per-tensor statistics that pass takes, written for few passes over each tensor
  layers.py    which modules are layers, and their names (``l03_conv``)
  theory.py    He et al.'s prediction of each layer's output scale (``gain_pred``, ``act_std_pred``)
  updates.py   the update ratio of a real optimizer step
  causes.py    naming a stall's cause from the measurements, and the thresholds that does it with
"""

from sweeper.diagnostics.causes import STALL_REASONS, classify_stall, gradient_lr, signal_cause, signal_ratio
from sweeper.diagnostics.hook import Diagnostics, trial_hooks
from sweeper.diagnostics.layers import LayerInfo
from sweeper.diagnostics.theory import (chain_second_moments, maxpool_factor, padding_fraction,
                                        position_energy, predicted_gain, predicted_stds,
                                        relu_correlation, spatial_correlation)
from sweeper.diagnostics.updates import last_step

__all__ = ["STALL_REASONS", "Diagnostics", "LayerInfo", "chain_second_moments", "classify_stall",
           "gradient_lr", "last_step", "maxpool_factor", "padding_fraction", "position_energy",
           "predicted_gain", "predicted_stds", "relu_correlation", "signal_cause", "signal_ratio",
           "spatial_correlation", "trial_hooks"]
