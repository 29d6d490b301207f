"""STL-10 with VGG's multi-scale training and multi-crop test: what does each add, and an ensemble after?

STL-10 has 5,000 labelled training images (10 classes, 96 x 96 px) and 8,000 test images: few enough
that augmentation decides the result. VGG (Simonyan & Zisserman) found scale jitter at training
(S in [256, 512]) worth ~1-2 points of top-1 error over a fixed S, and multi-crop testing (150 views,
soft-max posteriors averaged) another ~1 point; the STL-10 write-up then soft-voted the top trials.

Prediction: jittered S (scale_min=96) beats fixed S (scale_min=128) in validation and test error for
every depth; multi-crop test error (`test_multicrop_top1_error`) sits 1-2 points below single-crop
(`test_top1_error`); deeper (vgg16, vgg19) beats vgg11 with BN. The grid axis is `data.scale_min`
alone: 128 with scale_max=128 is a fixed S = 128, 96 the jittered S in [96, 128].

Follow-up, once the sweep has finished: soft-voting ensemble of the best trials (averaged soft-max
posteriors, like the views here), on the same fixed test set:
              sweeper ensemble stl10_ensemble --top 5

Images: STL-10's binaries hold 96 x 96 images. They are decoded once per node at data.resolution=128
(upsampled, so that S spans [96, 128] by shrinking only; 13,000 images x 3 x 128 x 128 = 0.64 GB of
uint8 per trial on the GPU; at the native 96 it would be 0.36 GB) and cropped to 96, the native side.
Test: Q in {96, 112, 128} x 2 flips x 5 x 5 crops = 150 views per image, as VGG.

Data: put the official binaries at DIR/stl10_binary/ (train_X.bin, train_y.bin, test_X.bin, test_y.bin,
unlabeled_X.bin: torchvision checks all five) and pass --data-dir DIR (data.dir) on every node.

Cluster run:  sweeper launch search_spaces/stl10_ensemble.py --address auto --data-dir /data
Quick run on a CPU (1/8 width, 2,000 training images at the native 96 px, 64-px crops from S in
[72, 96] (the override replaces the scale_min axis: 3 cells), 3 x 3 x 2 views at Q in {72, 96}, i.e.
36 per test image; not timed here, no STL-10 on this machine; all 8,000 test images are evaluated):
  sweeper launch search_spaces/stl10_ensemble.py --local --data-dir /data width=1/8 limit=2000 \\
      max_epochs=4 grace_period=2 data.resolution=96 data.crop=64 data.scale_min=72 data.scale_max=96 \\
      data.test_scales=72,96 data.test_grid=3
"""

from ray import tune

from sweeper.spaces import Sweep

SWEEP = Sweep(
    name="stl10_ensemble",
    space={
        "model.arch": tune.grid_search(["vgg11", "vgg16", "vgg19"]),  # VGG A, D, E
        "model.batch_norm": True,  # 5,000 images from scratch: BN so that depth is the variable
        "model.init": "he",  # trains every depth (search_spaces/vgg_depth.py)
        "model.width": 1.0,  # the paper's widths on a GPU; width=1/8 for a CPU run
        "model.head": "compact",  # global pool + linear: 96 crops leave 3x3 maps
        "optim.lr": tune.loguniform(3e-3, 1e-1),  # BN tolerates VGG's 1e-2 and above
        "optim.schedule": "cosine",  # ends every trial at lr ~ 0: comparable final weights to ensemble
        "optim.weight_decay": 5e-4,  # VGG recipe
        "data.name": "stl10",
        "data.resolution": 128,  # stored side = S_max (upsampled once from 96 at decode)
        "data.crop": 96,  # network input: STL-10's native side
        # 96: S in [96, 128] (jitter); 128: S = 128 fixed (VGG's single-scale training).
        "data.scale_min": tune.grid_search([96, 128]),
        "data.scale_max": 128,  # = data.resolution: images are only ever shrunk
        "data.crop_padding": 0,  # crops fall inside the rescaled image, as VGG
        "data.test_scales": "96,112,128",  # the span of S and its middle
        "data.test_grid": 5,  # 5 x 5 crops per scale, as VGG
        "data.test_flips": True,  # x 2 flips: 150 views per image
        "data.val_fraction": 0.1,  # 500 validation images for ASHA and for picking the ensemble
        "data.batch_size": 64,  # 5,000 images: ~70 steps per epoch
        "data.color_shift": 0.1,  # AlexNet/VGG PCA colour shift, alpha ~ N(0, 0.1)
    },
    search="random",  # grid axes expanded; lr sampled per trial
    num_samples=4,  # learning rates per cell: 6 cells x 4 = 24 trials, the ensemble's candidates
    max_epochs=60,  # small dataset, many epochs; one ASHA time unit = one epoch
    grace_period=5,  # jittered training learns slower at first; don't judge before epoch 5
    reduction_factor=3,  # each rung keeps the top third of its cell
    resources="auto",  # a training step measured per shape at launch; 0.64 GB of data per trial on top
    seed=0,
)
