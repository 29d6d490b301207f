"""Deeper VGGs initialised from a trained VGG-A: does the paper's own way past the stall escape chance?

Simonyan & Zisserman (sec. 3.1) trained configuration A from N(0, 0.01^2) weights, then, "to
circumvent" the stall of deeper nets, initialised "the first four convolutional layers and the last
three fully-connected layers with the layers of net A (the intermediate layers were initialised
randomly)"; the Food-101 write-up did the same. `vgg_depth` shows D and E (16/19 layers) sitting at
ln(10) with N(0, 0.01^2) init. Here D and E x init (normal, as the paper; he) x source (none; the best
trial of a VGG-A sweep, model.init_layers='vgg_paper') x BatchNorm (off; on) -- 16 cells.

Which layers: A's conv1_1, conv2_1, conv3_1, conv3_2 go to the layers of the same names in D/E
(stage and position, not the k-th conv: D's second conv is 64->64, A's is 64->128), with the head's
linear layers (one for the compact head used here). The copied layers carry a trained signal, but
with normal init the 9 (D) or 12 (E) random convs still shrink it ~10x each (He et al. 2015).

Prediction: init_from A with normal init still stalls at width 1/8 (the random middle layers vanish
the signal; the paper's full-width nets at 224 px shrink it less) -- the report's at-chance column
says whether it escaped; he and BN train with or without A, and A's layers speed their first epochs.

First the source: a VGG-A sweep, whose best trial (by its metric) is copied. The paper's A:
              sweeper launch search_spaces/vgg_depth.py --address auto --name vgg_a \
                  model.arch=vgg11 model.init=normal model.batch_norm=false
              sweeper launch search_spaces/vgg_from_a.py --address auto
The init_from reference is resolved before Ray starts (a missing source sweep is an error naming the
sweeps that exist); each trial's model.init_from param is the checkpoint it copied.
Quick run on a laptop CPU (digits, width 1/8). At width 1/8 A itself stalls with N(0, 0.01^2), so the
quick source is A with He init -- copying an untrained A would say nothing:
              sweeper launch search_spaces/vgg_depth.py --local --name vgg_a dataset=digits \
                  width=1/8 max_epochs=6 model.arch=vgg11 model.init=he model.batch_norm=false
              sweeper launch search_spaces/vgg_from_a.py --local dataset=digits width=1/8 max_epochs=6
"""

from ray import tune

from sweeper.spaces import Sweep

SWEEP = Sweep(
    name="vgg_from_a",
    space={
        "model.arch": tune.grid_search(["vgg16", "vgg19"]),  # the paper's D and E
        "model.init": tune.grid_search(["normal", "he"]),  # the paper's init vs He et al.'s
        "model.batch_norm": tune.grid_search([False, True]),
        # None: the layer's own init everywhere; the reference: A's best trial, by the source sweep's
        # metric (its last checkpoint), resolved by the driver to that checkpoint's location.
        "model.init_from": tune.grid_search([None, "sweep:vgg_a/best"]),
        "model.init_layers": "vgg_paper",  # first 4 convs + head linears (sec. 3.1); rest random
        "model.init_std": 0.01,  # `normal` as Caffe read the paper (as vgg_depth)
        "model.width": 1.0,  # must equal the source's: layers are copied shape for shape
        "model.head": "compact",  # as vgg_depth (the source): global pool + one linear
        # Searched per cell, as vgg_depth: 1e-3 is where BN-free deep nets stop collapsing,
        # 1e-1 is past what BN-free VGG tolerates.
        "optim.lr": tune.loguniform(1e-3, 1e-1),
        "optim.schedule": "plateau",  # VGG: lr / 10 when validation accuracy stops improving
        "optim.weight_decay": 5e-4,  # VGG recipe
        "data.name": "cifar10",  # the source's dataset: the head is copied, so the classes must match
        "data.batch_size": 128,  # as vgg_depth
        "data.color_shift": 0.1,  # AlexNet/VGG PCA colour shift, alpha ~ N(0, 0.1)
    },
    search="random",
    num_samples=2,  # learning rates per cell: 16 cells x 2 = 32 trials
    max_epochs=30,  # one ASHA time unit = one epoch
    grace_period=3,  # a copied start may still begin late; don't judge before epoch 3
    reduction_factor=3,  # each rung keeps the top third (within its cell)
    resources="auto",  # E needs ~1.2x D's activation memory: measured, not guessed
    seed=0,
)
