# FCOS at the size of the toy RetinaNet (ResNet-18-FPN, 64 channels, trainable BN, 2 convs
# per subnet, 3 classes) with BNFCOSHead.
from detectron2.layers import ShapeSpec

from .fcos import model
from .toy_retinanet import make_toy_backbone

make_toy_backbone(model, "BN", top_block_channels=64)  # P6 from P5 (64 channels)
model.head.input_shape = [ShapeSpec(channels=64)] * 5
model.head.conv_dims = [64, 64]
model.num_classes = 3
