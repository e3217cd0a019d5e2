# The small Mask R-CNN of configs/Toy/mask_rcnn_R18_FPN_base.yaml (ResNet-18-FPN, 64 channels,
# GN backbone, levels p3-p6, 4conv1fc box head and 4-conv mask head with 64 channels, no
# norm in the heads until a variant sets one, 3 classes) with d2_batchnorm's heads.
from detectron2.layers import ShapeSpec

from .mask_rcnn_fpn import model
from .toy_retinanet import make_toy_backbone

make_toy_backbone(model, "GN", top_block_channels=0)
model.backbone.bottom_up.out_features = ["res3", "res4", "res5"]
rpn = model.proposal_generator
rpn.in_features = ["p3", "p4", "p5", "p6"]
rpn.head.in_channels = 64
rpn.anchor_generator.sizes = [[16], [32], [64], [128]]
rpn.anchor_generator.strides = [8, 16, 32, 64]
rpn.pre_nms_topk = (600, 300)
rpn.post_nms_topk = (200, 100)
roi_heads = model.roi_heads
roi_heads.num_classes = 3
roi_heads.batch_size_per_image = 64
roi_heads.box_in_features = roi_heads.mask_in_features = ["p3", "p4", "p5"]
roi_heads.box_pooler.scales = roi_heads.mask_pooler.scales = (1.0 / 8, 1.0 / 16, 1.0 / 32)
roi_heads.box_head.input_shape = ShapeSpec(channels=64, height=7, width=7)
roi_heads.box_head.conv_dims = [64] * 4
roi_heads.box_head.fc_dims = [256]
roi_heads.box_predictor.input_shape = ShapeSpec(channels=256)
roi_heads.mask_head.input_shape = ShapeSpec(channels=64, width=14, height=14)
roi_heads.mask_head.conv_dims = [64] * 5
del rpn, roi_heads
