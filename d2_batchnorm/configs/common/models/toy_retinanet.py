# The small RetinaNet of configs/Base-RetinaNet-Toy.yaml (ResNet-18-FPN, 64 channels,
# trainable BN, 2 convs per subnet, 3 classes, no pretrained weights) as BNRetinaNet.
from detectron2.layers import ShapeSpec

from .retinanet import model


def make_toy_backbone(model, norm: str, top_block_channels: int) -> None:
    """ResNet-18-FPN with 64 channels and trainable ``norm``, 3 classes, pixel std 1 (yacs' default)."""
    bottom_up = model.backbone.bottom_up
    bottom_up.stem.norm = bottom_up.stages.norm = norm
    bottom_up.stages.depth = 18
    del bottom_up.stages.stride_in_1x1  # basic blocks have no 1x1 conv
    bottom_up.freeze_at = 0
    model.backbone.out_channels = 64
    if "top_block" in model.backbone and "in_channels" in model.backbone.top_block:
        model.backbone.top_block.in_channels = top_block_channels
    model.pixel_std = [1.0, 1.0, 1.0]


make_toy_backbone(model, "BN", top_block_channels=512)  # P6 from res5 (512 channels)
model.head.input_shape = [ShapeSpec(channels=64)] * 5
model.head.conv_dims = [64, 64]
model.anchor_generator.sizes = [[16, 20, 25], [32, 40, 50], [64, 80, 101], [128, 161, 203], [256, 322, 406]]
model.num_classes = 3
