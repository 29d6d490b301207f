"""VGG depth x init x BatchNorm: which deep plain VGGs stall, and why?

Simonyan & Zisserman trained VGG-A from random N(0, 0.01^2) weights but found deeper nets stalled
("bad initialisation can stall learning due to the instability of gradient in deep nets"); He et al.
(2015) showed std 0.01 shrinks the signal by g = n*Var[w]/2 << 1 per layer, Xavier by ~1/2 per layer,
and that He init (g = 1) trains 22-30 layer plain nets; BatchNorm makes the weight scale irrelevant.

Prediction: without BN, `normal` stalls at loss ln(10) from depth 11 at width 1/8 (from 13 at full
width), `xavier` stalls from ~16 layers, `he` trains at every depth; every cell with BN trains.
Every cell of the 4 x 3 x 2 grid runs, because a stalled cell is the finding; the learning rate is
tuned within each cell so that "stalled" means stalled at its best learning rate.

Cluster run:  sweeper launch search_spaces/vgg_depth.py --address auto
Quick run on a laptop CPU (digits, width 1/8, ~3 min on 2 cores):
              sweeper launch search_spaces/vgg_depth.py --local dataset=digits width=1/8 max_epochs=6
One trial in the foreground, no Ray:
              sweeper debug search_spaces/vgg_depth.py dataset=digits width=1/8 model.arch=vgg16
"""

from ray import tune

from sweeper.spaces import Sweep

SWEEP = Sweep(
    name="vgg_depth",
    space={
        # The factorial: the paper's configurations A, B, D, E (11/13/16/19 weight layers with the
        # paper's 3-FC head; 9/11/14/17 with the compact head used here, as the report counts them).
        "model.arch": tune.grid_search(["vgg11", "vgg13", "vgg16", "vgg19"]),
        "model.init": tune.grid_search(["normal", "xavier", "he"]),
        "model.batch_norm": tune.grid_search([False, True]),
        "model.init_std": 0.01,  # `normal` as Caffe read the paper; 0.1 (the literal reading) explodes
        "model.width": 1.0,  # full VGG widths on a GPU; 1/8 keeps a CPU run to minutes
        "model.head": "compact",  # global pool + linear: the 4096-wide head is for 224x224 inputs
        # Searched per cell: 1e-3 is where BN-free deep nets stop collapsing (science note 5),
        # 1e-1 is past what BN-free VGG tolerates (torchvision's references use 1e-2).
        "optim.lr": tune.loguniform(1e-3, 1e-1),
        "optim.schedule": "plateau",  # VGG: lr / 10 when validation accuracy stops improving
        "optim.weight_decay": 5e-4,  # VGG recipe
        "data.name": "cifar10",
        "data.batch_size": 128,  # the paper's 256 halved for 32x32 inputs and shared GPUs
        "data.color_shift": 0.1,  # AlexNet/VGG PCA colour shift, alpha ~ N(0, 0.1)
    },
    search="random",  # grid axes expanded by Ray's generator; lr sampled per trial
    num_samples=3,  # learning rates tried per cell: 24 cells x 3 = 72 trials
    max_epochs=30,  # one ASHA time unit = one epoch
    grace_period=3,  # deep plain nets may start late; don't judge before epoch 3
    reduction_factor=3,  # each rung keeps the top third
    # VGG-19 at full width needs ~2x the activation memory of VGG-11: rather than guess one fraction
    # for both, a training step of each is measured at launch and as many trials share a GPU as fit
    # (the plan is printed). On a CPU-only machine each trial takes one CPU.
    resources="auto",
    seed=0,
)
