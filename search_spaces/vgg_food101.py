"""VGG A, A-LRN, B, C, D, E x init x BatchNorm on Food-101: does the VGG paper's table hold?

Simonyan & Zisserman's Table 3/4 (ILSVRC, multi-scale training S in [256, 512], 224 crops): LRN does
not improve A (A-LRN is no better); error falls with depth (A 11 -> B 13 -> D 16 -> E 19 layers);
C (three 1x1 convs) is worse than D (3x3 in their place) at the same depth, so spatial context
matters, not only the extra non-linearity; scale jitter beats a fixed S by ~1.2 points of top-1
error (Table 3), and multi-scale, multi-crop testing (150 views) a single test scale by another ~1
(Tables 3-5). They trained A from N(0, 0.01^2) and initialised deeper nets from it; here every net
starts from scratch, so `normal` is expected to stall the deep BN-free cells (see
search_spaces/vgg_depth.py) and `he` / BatchNorm to train them.

Prediction on Food-101 (101 dishes, 75,750 train / 25,250 test images, official meta split): the
ordering A ~ A-LRN > B > C > D ~ E in top-1 error holds for `he` and for every BN cell; multi-crop top-1
error (`test_multicrop_top1_error`) is 1-3 points below single-crop (`test_top1_error`) in every cell
that trained. Each trial reports both, top-1 and top-5, after its last epoch (on its MLflow run, and
in the last row per trial of `sweeper export vgg_food101 --epochs`: test_top1_error, test_top5_error,
test_multicrop_top1_error, test_multicrop_top5_error, test_views = 150).

Images: Food-101's files are up to 512 px on the longer side. Each is decoded ONCE per node, shorter
side to data.resolution and centre-cropped square (sweeper.data.sources, cached by sweeper.data.cache;
memory-mapped, so trials on a node share the page cache), never kept at 512 px. Geometry is VGG's at
half its scale at the small end: crop 112 from S in [128, 160] (VGG: 224 from [256, 512]; S_min/crop
= 1.14 in both), test scales Q in {128, 144, 160} x 2 flips x 5 x 5 = 150 views. S_max/S_min is
1.25 here, not VGG's 2: S up to 256 would need data.resolution=256, i.e. 19.9 GB of uint8 per trial
on the GPU.

Memory per trial on the GPU (the splits live there as uint8, 3 x R x R bytes per image, 101,000 images;
a trial whose data does not fit stops at once with a message, sweeper.data.device.DataTooLarge):
R=64: 1.2 GB, R=128: 5.0 GB, R=160: 7.8 GB (this study), R=256: 19.9 GB. Host RAM per trial is about
the same again while the trial runs (its train/val split is gathered from the memory-mapped cache).
On an 80 GB GPU that leaves room for roughly 6 such trials (an estimate, not measured: ~3 GB for a
VGG-19 step at batch 64, 112 px, bf16, plus 0.5 GB of CUDA context each).

Data: put the official release at DIR/food-101/ (meta/train.json, meta/test.json, images/<class>/*.jpg)
and pass --data-dir DIR (data.dir) on every node; the first trial on a node decodes it (minutes).

Cluster run:  sweeper launch search_spaces/vgg_food101.py --address auto --data-dir /data
Quick run on a CPU (He init only: 12 trials at 1/8 width, 5,000 training images decoded at 64 px,
48-px crops, 4 test views per image; expect the ordering, not the numbers). Not timed here (no
Food-101 on this machine): data.limit shortens training only, so the test of all 25,250 official test
images (single-crop, then 4 views each) takes a large share of each trial on a CPU:
  sweeper launch search_spaces/vgg_food101.py --local --data-dir /data width=1/8 limit=5000 \\
      model.init=he num_samples=1 max_epochs=4 data.resolution=64 data.crop=48 data.scale_min=56 \\
      data.scale_max=64 data.test_scales=56,64 data.test_grid=1
One trial in the foreground, no Ray:
  sweeper debug search_spaces/vgg_food101.py --data-dir /data width=1/8 limit=2000 model.arch=vgg16c
"""

from ray import tune

from sweeper.spaces import Sweep

SWEEP = Sweep(
    name="vgg_food101",
    space={
        # The paper's table: A, A-LRN, B, C, D, E (11, 11, 13, 16 with 1x1, 16, 19 weight layers).
        "model.arch": tune.grid_search(["vgg11", "vgg11_lrn", "vgg13", "vgg16c", "vgg16", "vgg19"]),
        # normal: the paper's N(0, 0.01^2) (std below); xavier: Glorot, as the paper's footnote
        # suggests; he: the init that trains deep plain nets from scratch (He et al. 2015).
        "model.init": tune.grid_search(["normal", "xavier", "he"]),
        "model.batch_norm": tune.grid_search([False, True]),
        "model.init_std": 0.01,  # `normal` as Caffe read the paper
        "model.width": 1.0,  # the paper's widths on a GPU; width=1/8 for a CPU run
        # Global pool + linear: the paper's 4096-4096 head is sized for 7x7 maps of 224 crops; a 112
        # crop leaves 3x3, and the FC head would hold 90% of the parameters for little gain.
        "model.head": "compact",
        # Searched per cell; 1e-2 is the paper's start, 1e-3 where BN-free deep nets stop collapsing.
        "optim.lr": tune.loguniform(1e-3, 5e-2),
        "optim.schedule": "plateau",  # VGG: lr / 10 when validation accuracy stops improving
        "optim.weight_decay": 5e-4,  # VGG recipe
        "data.name": "food101",
        "data.resolution": 160,  # stored side = S_max: decoded once at this size, only ever shrunk
        "data.crop": 112,  # network input; 5 poolings leave 3x3 maps
        "data.scale_min": 128,  # S in [128, 160]: VGG's S_min/crop = 256/224 ratio
        "data.scale_max": 160,  # bounded by data.resolution (memory, above)
        "data.crop_padding": 0,  # VGG crops inside the rescaled image; no zero border
        "data.test_scales": "128,144,160",  # VGG's {S_min, mid, S_max} for jittered training
        "data.test_grid": 5,  # 5 x 5 crops per scale, as VGG
        "data.test_flips": True,  # x 2 flips: 150 views per image
        "data.val_fraction": 0.05,  # 3,788 validation images for ASHA; test: the official 25,250
        "data.batch_size": 64,  # the paper's 256 / 4: several trials share a GPU
        "data.color_shift": 0.1,  # AlexNet/VGG PCA colour shift, alpha ~ N(0, 0.1)
    },
    search="random",  # grid axes expanded; lr sampled per trial
    num_samples=2,  # learning rates per cell: 36 cells x 2 = 72 trials
    max_epochs=30,  # one ASHA time unit = one epoch; multi-crop test runs once, after the last
    grace_period=3,  # deep plain nets may start late; don't judge before epoch 3
    reduction_factor=3,  # each rung keeps the top third of its cell
    # Measured per config shape at launch (VGG-19 needs ~2x VGG-11's activations); one CPU per trial
    # without a GPU. Caveat: the packing measures a training step, not the 7.8 GB of data each trial
    # also holds (see Memory above); a trial that finds too little free memory stops with
    # DataTooLarge, but trials starting together can all pass that check. Until the packing counts
    # the data, lower data.resolution or run fewer trials per GPU on small cards.
    resources="auto",
    seed=0,
)
