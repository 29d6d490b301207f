"""GoogLeNet's auxiliary classifiers: do they help a BN-free Inception v1 train, and at what weight?

Szegedy et al. (2015) added two auxiliary heads (after 4a and 4d) with loss weight 0.3 "to combat the
vanishing gradient problem" in a 22-layer net trained without BatchNorm. With BN (Inception v2) they
reported the heads act mostly as regularisers. Optuna TPE searches the aux weight and the learning
rate jointly, with and without the heads and with and without BN.

Prediction: without BN, aux heads shorten the plateau at the start of training; with BN their
effect on final accuracy is within noise.

Quick run:  sweeper launch search_spaces/googlenet_aux.py --local dataset=digits width=1/8 max_epochs=4 num_samples=8
"""

from ray import tune

from sweeper.spaces import Sweep

SWEEP = Sweep(
    name="googlenet_aux",
    space={
        "model.arch": "googlenet",
        "model.aux_heads": tune.choice([True, False]),
        "model.aux_weight": tune.uniform(0.0, 1.0),  # the paper's 0.3 sits inside; 0 = heads unused
        "model.batch_norm": tune.choice([False, True]),
        "model.init": "xavier",  # the Inception v1 era's init (Glorot)
        "model.width": 1.0,
        "optim.lr": tune.loguniform(1e-3, 1e-1),
        "optim.schedule": "cosine",
        "data.name": "cifar10",
        "data.batch_size": 128,
    },
    search="optuna",  # TPE over a continuous weight; no grid axes
    num_samples=24,
    max_concurrent=4,  # TPE learns from finished trials: too many at once makes it random search
    max_epochs=20,
    grace_period=2,
    reduction_factor=3,
    resources={"cpu": 1, "gpu": 0.25},
    seed=0,
)
