"""Plain VGG vs ResNet-18 at matched depth: is it depth, or the missing shortcut, that stalls?

He et al. (2016) found an 18-layer plain net trains worse than its residual twin, and the gap grows
with depth. Here the two sides have about the same depth on the main path under the same CIFAR
stem conditions: VGG-19 (E; 17 weight layers with the compact head: 16 convs + 1 linear) against
ResNet-18 with the CIFAR stem (17 convs + 1 linear on the main path; 3 projection shortcuts beside it),
each with and without BatchNorm, under Xavier and He init.

Prediction: without BN, the plain net stalls under Xavier (g ~ 1/2 per layer) while ResNet-18 trains
(its identity paths carry the signal past every block); with He init both train, ResNet fastest.

Quick run:  sweeper launch search_spaces/plain_vs_residual.py --local dataset=digits width=1/8 max_epochs=4
"""

from ray import tune

from sweeper.spaces import Sweep

SWEEP = Sweep(
    name="plain_vs_residual",
    space={
        "model.arch": tune.grid_search(["vgg19", "resnet18"]),
        "model.init": tune.grid_search(["xavier", "he"]),
        "model.batch_norm": tune.grid_search([False, True]),
        "model.stem": "cifar",  # 3x3 stride 1, no max-pool: a 32x32 input keeps its resolution
        "model.width": 1.0,
        "model.head": "compact",  # the same global-pool + linear head for both families
        "optim.lr": tune.loguniform(3e-3, 1e-1),  # BN-free nets need the low end, BN nets the high
        "optim.schedule": "cosine",
        "data.name": "cifar10",
        "data.batch_size": 128,
    },
    search="random",
    num_samples=2,  # learning rates per cell: 8 cells x 2 = 16 trials
    max_epochs=20,
    grace_period=3,  # a plain net at chance for 3 epochs is a finding, not noise
    reduction_factor=3,
    resources={"cpu": 1, "gpu": 0.25},
    seed=0,
)
