"""Test checkpoints for the two-stage detectors that actually detect something.

No pretrained weights can be downloaded, and seeded random weights detect nothing: the
softmax over 91 classes stays near 1/91, under the 0.05 score threshold, and with
identity batch-norm statistics the random backbone's features hardly depend on the
image. `make_checkpoint` therefore:

1. seeds torchvision's model (stock builder, 91 COCO classes);
2. sets every batch norm's statistics from the calibration photos (data-dependent
   initialization: one train-mode pass of the backbone, cumulative averages), so that
   features vary with the image;
3. centres the box classifier's logits per class and scales them to a spread of
   ``LOGIT_SPREAD``, and
   gives background a bias of ``BACKGROUND_BIAS``: the softmax is peaky, a minority of
   (proposal, class) pairs pass the score threshold, and NMS keeps several per photo;
4. (Mask R-CNN) rescales the mask logits so that masks are far from 0.5 almost
   everywhere, so that thresholded masks are stable;
5. saves the state_dict in torchvision's published format (FrozenBatchNorm2d: no
   ``num_batches_tracked`` keys).

The detection counts are asserted by the tests that use these checkpoints.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from helpers import as_array, photo

CALIBRATION_PHOTOS = ("astronaut.png", "coffee.png")
CALIBRATION_SIZE = 320
CALIBRATION_PROPOSALS = 300  # per photo, for the logit statistics
# The box classifier (see make_checkpoint), chosen by a grid search on the four test
# photos' features (astronaut, coffee, chelsea, motorcycle_left).
CLASS_SPREAD, BACKGROUND_LOGIT = 4.5, 10.0
# Per architecture: 50-300 candidates per photo (under Mask R-CNN's K = 300).
BACKGROUND_BIAS = {"fasterrcnn_mobilenet_v3_large_fpn": 5.0, "fasterrcnn_resnet50_fpn": 6.0,
                   "maskrcnn_resnet50_fpn": 6.0}
MASK_LOGIT_SPREAD = 8.0  # std of the mask logits


def photo_tensor(name: str, max_side: int = CALIBRATION_SIZE):
    """A photo as torchvision detection models take it: float [3, H, W] in [0, 1]."""
    import torch

    return torch.from_numpy(np.array(as_array(photo(name, max_side)))).permute(2, 0, 1).float() / 255.0


def make_checkpoint(arch_name: str, path: Path, seed: int = 0) -> Path:
    import torch

    from service.export import tvshim

    tvshim.install()
    import torchvision

    torch.manual_seed(seed)
    model = getattr(torchvision.models.detection, arch_name)(
        weights=None, weights_backbone=None, num_classes=91, min_size=CALIBRATION_SIZE,
        max_size=round(CALIBRATION_SIZE * 1333 / 800))
    images = [photo_tensor(name) for name in CALIBRATION_PHOTOS]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    model.eval()
    with torch.no_grad():
        batch = model.transform(images)[0]
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # cumulative average over the pass
            norm.train()
        model.backbone(batch.tensors)
        model.eval()

        features = model.backbone(batch.tensors)
        proposals, _ = model.rpn(batch, features)
        proposals = [p[:CALIBRATION_PROPOSALS] for p in proposals]
        heads = model.roi_heads
        box_features = heads.box_head(heads.box_roi_pool(features, proposals, batch.image_sizes))
        # The box classifier, rebuilt from the calibration features f (ReLU outputs,
        # all sharing a mean direction u): background's row is along u, scaled so that
        # its logit averages BACKGROUND_LOGIT, plus bias BACKGROUND_BIAS; each class's row
        # is its random row with the u component removed, scaled so that the class
        # logits' spread is CLASS_SPREAD. A proposal becomes a candidate where a class
        # beats background by chance; both sides grow with |f|, which keeps the count
        # per photo within a narrow range.
        cls = heads.box_predictor.cls_score
        u = box_features.mean(0)
        u = u / u.norm()
        rows = cls.weight[1:] - (cls.weight[1:] @ u)[:, None] * u[None]
        background = u * (BACKGROUND_LOGIT / (box_features @ u).mean())
        cls.weight.copy_(torch.cat([background[None], rows * (CLASS_SPREAD / (box_features @ rows.T).std())]))
        cls.bias.zero_()
        cls.bias[0] = BACKGROUND_BIAS[arch_name]
        if heads.has_mask():
            rois = [p[:50] for p in proposals]
            mask_logits = heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(features, rois,
                                                                                    batch.image_sizes)))
            layer = heads.mask_predictor.mask_fcn_logits
            layer.weight.mul_(MASK_LOGIT_SPREAD / mask_logits.std())
            layer.bias.mul_(MASK_LOGIT_SPREAD / mask_logits.std())
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, path)
    return Path(path)
