"""Fine-tuning a pretrained backbone vs training from scratch: how much of the net must train?

The original write-up: ResNet-18 on CIFAR-10 with its ImageNet backbone frozen and a new linear head
reached 79% test accuracy, where a small BN CNN trained from scratch reached 54%. Is that the
features (Yosinski et al. 2014: lower layers transfer, top layers are task-specific) or just a better
architecture? Four arms, each at its own best learning rate: the backbone frozen (a linear probe on
the pretrained features), all but the last 2 blocks frozen (layer4 and the head train), a full
fine-tune, and the same ResNet-18 from scratch.

The grid is model.freeze x model.init_layers ('backbone': load the pretrained backbone; 'none': the
same trial with nothing loaded, i.e. from scratch, with the same input normalisation). The factorial
also runs two controls: a frozen random backbone (Jarrett et al. 2009's random features) and frozen
random lower blocks. They split a frozen arm's accuracy into what the pretrained weights give and
what training the head and top blocks alone gives.

Prediction: frozen-pretrained >> frozen-random; partial >= full fine-tune > scratch within 15 epochs
(full fine-tuning at a high lr destroys the features, so its best lr is ~10x below the probe's).

Cluster run (the weights must be in torch.hub's cache on every node: sweeper never downloads; once per
node, with network:  python -c "import torchvision; torchvision.models.get_weight(
'ResNet18_Weights.IMAGENET1K_V1').get_state_dict()"):
              sweeper launch search_spaces/finetune_vs_scratch.py --address auto
Quick run on this machine, offline (~2 min on 2 cores). A tiny stand-in replaces ImageNet's
weights: a ResNet-18 at width 1/8 (CIFAR stem) trained 2 epochs on the synthetic gratings, a task
unlike digits, so the probe measures transfer from another task; it tests the machinery, not
ImageNet's features. One lr for every arm (0.03: where scratch and fine-tuning both train in 4 epochs)
so that 6 trials compare the arms rather than lucky lr draws:
              python -m sweeper.transfer standin /tmp/standin-r18.pt
              sweeper launch search_spaces/finetune_vs_scratch.py --local dataset=digits width=1/8 \
                  model.stem=cifar data.resolution=None data.crop_padding=4 \
                  model.pretrained=/tmp/standin-r18.pt max_epochs=4 num_samples=1 lr=0.03
  Seen once (seed 0, 2026-11-26; best val accuracy in 4 epochs, stand-in / nothing loaded): frozen
  backbone 0.14 / 0.11 -- orientation gratings give digits almost nothing a linear head can use;
  all_but_last:2 0.67 / 0.82; full fine-tune 0.85 / 0.70 (scratch). One seed and one lr: a hint that
  the stand-in helps only when its layers may move, not a result.
One trial in the foreground, no Ray:
              sweeper debug search_spaces/finetune_vs_scratch.py dataset=digits width=1/8 \
                  model.stem=cifar data.resolution=None model.pretrained=/tmp/standin-r18.pt
"""

from ray import tune

from sweeper.spaces import Sweep

SWEEP = Sweep(
    name="finetune_vs_scratch",
    space={
        "model.arch": "resnet18",
        "model.batch_norm": True,  # torchvision's ResNet-18 has BN: the weights need it
        "model.stem": "imagenet",  # 7x7/2 + max-pool: the layout the ImageNet weights were trained in
        "model.width": 1.0,  # the weights' width; the quick form's stand-in is width 1/8
        # Read from torch.hub's cache; also sets ImageNet's mean/std as the input normalisation (for
        # every cell: the scratch arm sees the same inputs).
        "model.pretrained": "ResNet18_Weights.IMAGENET1K_V1",
        # The arms: frozen backbone (linear probe) / layer4 + head train / everything trains.
        "model.freeze": tune.grid_search(["backbone", "all_but_last:2", "none"]),
        # 'backbone': load the pretrained backbone; 'none': nothing loaded (scratch and its controls).
        "model.init_layers": tune.grid_search(["backbone", "none"]),
        "model.init": "he",  # for whatever is not loaded: the new head, and the scratch arm
        # Searched per cell: a probe trains only the head (1e-2..1e-1 is usual); a full fine-tune keeps
        # its features only ~10x lower; 1e-4 is where 15 epochs stop being enough for scratch.
        "optim.lr": tune.loguniform(1e-4, 1e-1),
        "optim.schedule": "cosine",  # no plateau detection to wait for in 15 epochs
        "optim.weight_decay": 5e-4,  # torchvision's reference fine-tuning recipes
        "data.name": "cifar10",
        # Half the weights' 224 px: layer4 still sees a 4x4 map (1x1 at CIFAR's 32), and CIFAR-10
        # at 112 px is 2.3 GB per trial on the device where 224 px would be 9 GB. Warned about at
        # trial start: the mismatch is a choice, stated here.
        "data.resolution": 112,
        "data.crop_padding": 14,  # CIFAR's usual 4 px at 32 px, scaled to 112
        "data.batch_size": 128,
    },
    search="random",  # grid axes expanded; lr sampled per trial
    num_samples=3,  # learning rates per cell: 6 cells x 3 = 18 trials
    max_epochs=15,  # a probe converges in a few epochs; scratch is the slow arm, and is meant to be
    grace_period=3,  # the frozen-random controls start slow; don't judge before epoch 3
    reduction_factor=3,  # each rung keeps the top third (within its cell)
    resources="auto",  # measured per config shape: a frozen backbone needs no gradients below layer4
    seed=0,
)
