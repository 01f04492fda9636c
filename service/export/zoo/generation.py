"""Image-to-image generators: Pix2Pix (Isola et al., 2017) and CycleGAN (Zhu et al.,
2017), as defined in the official code (junyanz/pytorch-CycleGAN-and-pix2pix,
`models/networks.py`), so its `latest_net_G.pth` checkpoints load strictly:

- `ResnetGenerator` (CycleGAN's `resnet_9blocks`): state_dict keys `model.1.weight`,
  `model.10.conv_block.1.weight`, ..., `model.26.weight`.
- `UnetGenerator` (pix2pix's `unet_256`): nested `UnetSkipConnectionBlock`s, keys
  `model.model.0.weight`, `model.model.1.model.1.weight`, ...

Images are [N, 3, H, W] RGB in [-1, 1] on both sides (the official
`transforms.Normalize((0.5,) * 3, (0.5,) * 3)` and `tensor2im`'s ``(x + 1) / 2 * 255``).
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...spec import TensorSpec
from ...pipelines import layouts
from . import Architecture, Normalize, Published, contract, register

# The official data pipeline maps pixels to [-1, 1]: (x / 255 - 0.5) / 0.5.
GAN_MEAN, GAN_STD = layouts.GAN_MEAN, layouts.GAN_STD
# ResnetGenerator downsamples twice by 2 (and upsamples back): sizes must be multiples
# of 4 for the output to have the input's size, and at least 8 so that the 64x64-level
# ReflectionPad2d(1) has a pixel to reflect at the 2x2 level.
CYCLEGAN_SIZE_MULTIPLE = 4
CYCLEGAN_MIN_SIDE = 8
# CycleGAN's compute grows with the pixel count (~56 GFLOP at 256x256); the gateway
# should cap the longer side before padding.
CYCLEGAN_MAX_SIDE = 512
# unet_256 halves the size 8 times down to 1x1: exactly 256x256 in.
PIX2PIX_SIZE = 256


# ----------------------------------------------------- official networks.py layout
class Identity(nn.Module):
    def forward(self, x):
        return x


def get_norm_layer(norm_type: str = "instance") -> Callable[[int], nn.Module]:
    """The official norm factories: 'batch' (affine, running stats), 'instance' (no
    affine, no running stats) or 'none'."""
    if norm_type == "batch":
        return functools.partial(nn.BatchNorm2d, affine=True, track_running_stats=True)
    if norm_type == "instance":
        return functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
    if norm_type == "none":
        def norm_layer(x):
            return Identity()
        return norm_layer
    raise NotImplementedError(f"normalization layer [{norm_type}] is not found")


def _uses_bias(norm_layer) -> bool:
    """Convolutions before an InstanceNorm keep their bias (it has no affine shift of its
    own); before a BatchNorm they drop it."""
    if isinstance(norm_layer, functools.partial):
        return norm_layer.func == nn.InstanceNorm2d
    return norm_layer == nn.InstanceNorm2d


class ResnetBlock(nn.Module):
    """pad -> 3x3 conv -> norm -> ReLU [-> dropout] -> pad -> 3x3 conv -> norm, plus the
    input (a residual connection)."""

    def __init__(self, dim: int, padding_type: str, norm_layer, use_dropout: bool, use_bias: bool):
        super().__init__()
        self.conv_block = self.build_conv_block(dim, padding_type, norm_layer, use_dropout, use_bias)

    @staticmethod
    def _padding(padding_type: str):
        if padding_type == "reflect":
            return [nn.ReflectionPad2d(1)], 0
        if padding_type == "replicate":
            return [nn.ReplicationPad2d(1)], 0
        if padding_type == "zero":
            return [], 1
        raise NotImplementedError(f"padding [{padding_type}] is not implemented")

    def build_conv_block(self, dim, padding_type, norm_layer, use_dropout, use_bias) -> nn.Sequential:
        pad, p = self._padding(padding_type)
        conv_block = pad + [nn.Conv2d(dim, dim, kernel_size=3, padding=p, bias=use_bias), norm_layer(dim),
                            nn.ReLU(True)]
        if use_dropout:
            conv_block += [nn.Dropout(0.5)]
        pad, p = self._padding(padding_type)
        conv_block += pad + [nn.Conv2d(dim, dim, kernel_size=3, padding=p, bias=use_bias), norm_layer(dim)]
        return nn.Sequential(*conv_block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class ResnetGenerator(nn.Module):
    """7x7 conv, two stride-2 downsamplings, `n_blocks` ResnetBlocks, two transposed-conv
    upsamplings, 7x7 conv, Tanh. [N, input_nc, H, W] -> [N, output_nc, H, W] in [-1, 1]
    for H, W multiples of 4."""

    def __init__(self, input_nc: int, output_nc: int, ngf: int = 64, norm_layer=nn.BatchNorm2d,
                 use_dropout: bool = False, n_blocks: int = 6, padding_type: str = "reflect"):
        assert n_blocks >= 0
        super().__init__()
        use_bias = _uses_bias(norm_layer)
        model = [nn.ReflectionPad2d(3),
                 nn.Conv2d(input_nc, ngf, kernel_size=7, padding=0, bias=use_bias),
                 norm_layer(ngf),
                 nn.ReLU(True)]
        n_downsampling = 2
        for i in range(n_downsampling):
            mult = 2 ** i
            model += [nn.Conv2d(ngf * mult, ngf * mult * 2, kernel_size=3, stride=2, padding=1, bias=use_bias),
                      norm_layer(ngf * mult * 2),
                      nn.ReLU(True)]
        mult = 2 ** n_downsampling
        for i in range(n_blocks):
            model += [ResnetBlock(ngf * mult, padding_type=padding_type, norm_layer=norm_layer,
                                  use_dropout=use_dropout, use_bias=use_bias)]
        for i in range(n_downsampling):
            mult = 2 ** (n_downsampling - i)
            model += [nn.ConvTranspose2d(ngf * mult, int(ngf * mult / 2), kernel_size=3, stride=2, padding=1,
                                         output_padding=1, bias=use_bias),
                      norm_layer(int(ngf * mult / 2)),
                      nn.ReLU(True)]
        model += [nn.ReflectionPad2d(3)]
        model += [nn.Conv2d(ngf, output_nc, kernel_size=7, padding=0)]
        model += [nn.Tanh()]
        self.model = nn.Sequential(*model)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.model(input)


class UnetSkipConnectionBlock(nn.Module):
    """One U-Net level: down (LeakyReLU, 4x4 stride-2 conv, norm), the inner levels, up
    (ReLU, 4x4 stride-2 transposed conv, norm), and the input concatenated to the output
    (except at the outermost level, which ends in Tanh)."""

    def __init__(self, outer_nc: int, inner_nc: int, input_nc: int | None = None, submodule=None,
                 outermost: bool = False, innermost: bool = False, norm_layer=nn.BatchNorm2d,
                 use_dropout: bool = False):
        super().__init__()
        self.outermost = outermost
        use_bias = _uses_bias(norm_layer)
        if input_nc is None:
            input_nc = outer_nc
        downconv = nn.Conv2d(input_nc, inner_nc, kernel_size=4, stride=2, padding=1, bias=use_bias)
        downrelu = nn.LeakyReLU(0.2, True)
        downnorm = norm_layer(inner_nc)
        uprelu = nn.ReLU(True)
        upnorm = norm_layer(outer_nc)
        if outermost:
            upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, kernel_size=4, stride=2, padding=1)
            model = [downconv] + [submodule] + [uprelu, upconv, nn.Tanh()]
        elif innermost:
            upconv = nn.ConvTranspose2d(inner_nc, outer_nc, kernel_size=4, stride=2, padding=1, bias=use_bias)
            model = [downrelu, downconv] + [uprelu, upconv, upnorm]
        else:
            upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, kernel_size=4, stride=2, padding=1, bias=use_bias)
            model = [downrelu, downconv, downnorm] + [submodule] + [uprelu, upconv, upnorm]
            if use_dropout:
                model += [nn.Dropout(0.5)]
        self.model = nn.Sequential(*model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outermost:
            return self.model(x)
        return torch.cat([x, self.model(x)], 1)


class UnetGenerator(nn.Module):
    """U-Net generator with `num_downs` stride-2 levels: [N, input_nc, H, W] ->
    [N, output_nc, H, W] in [-1, 1] for H, W multiples of 2**num_downs (unet_256:
    num_downs 8, 256x256)."""

    def __init__(self, input_nc: int, output_nc: int, num_downs: int, ngf: int = 64,
                 norm_layer=nn.BatchNorm2d, use_dropout: bool = False):
        super().__init__()
        unet_block = UnetSkipConnectionBlock(ngf * 8, ngf * 8, input_nc=None, submodule=None,
                                             norm_layer=norm_layer, innermost=True)
        for _ in range(num_downs - 5):
            unet_block = UnetSkipConnectionBlock(ngf * 8, ngf * 8, input_nc=None, submodule=unet_block,
                                                 norm_layer=norm_layer, use_dropout=use_dropout)
        unet_block = UnetSkipConnectionBlock(ngf * 4, ngf * 8, input_nc=None, submodule=unet_block,
                                             norm_layer=norm_layer)
        unet_block = UnetSkipConnectionBlock(ngf * 2, ngf * 4, input_nc=None, submodule=unet_block,
                                             norm_layer=norm_layer)
        unet_block = UnetSkipConnectionBlock(ngf, ngf * 2, input_nc=None, submodule=unet_block, norm_layer=norm_layer)
        self.model = UnetSkipConnectionBlock(output_nc, ngf, input_nc=input_nc, submodule=unet_block, outermost=True,
                                             norm_layer=norm_layer)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.model(input)


def resnet_9blocks(norm: str = "instance", use_dropout: bool = False) -> ResnetGenerator:
    """The official `define_G(3, 3, 64, 'resnet_9blocks', norm)`: CycleGAN's generator."""
    return ResnetGenerator(3, 3, 64, norm_layer=get_norm_layer(norm), use_dropout=use_dropout, n_blocks=9)


def unet_256(norm: str = "batch", use_dropout: bool = True) -> UnetGenerator:
    """The official `define_G(3, 3, 64, 'unet_256', norm)`: pix2pix's generator (pix2pix
    trains with dropout by default; it has no weights, so keys are the same either way)."""
    return UnetGenerator(3, 3, 8, 64, norm_layer=get_norm_layer(norm), use_dropout=use_dropout)


# ------------------------------------------------------------- official checkpoints
def adapt_official_state_dict(model: nn.Module, state_dict: dict) -> dict:
    """The official `load_networks` cleanup, for checkpoints saved before PyTorch 0.4:
    drop InstanceNorm `running_mean`/`running_var` (when the layer tracks none) and
    `num_batches_tracked`. A `module.` prefix (DataParallel) is dropped too. Returns a
    new dict; `state_dict` is not changed."""
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    modules = dict(model.named_modules())
    for key in list(state):
        owner, _, leaf = key.rpartition(".")
        module = modules.get(owner)
        if not isinstance(module, nn.modules.instancenorm._InstanceNorm):
            continue
        if leaf in ("running_mean", "running_var") and getattr(module, leaf) is None:
            del state[key]
        elif leaf == "num_batches_tracked":
            del state[key]
    return state


def load_official_state_dict(model: nn.Module, state_dict: dict) -> None:
    """Load an official `latest_net_G.pth` state_dict: clean it up as the official code
    does, then load strictly (any other mismatch is an error)."""
    model.load_state_dict(adapt_official_state_dict(model, state_dict), strict=True)


# ------------------------------------------------------------------------ export
class PerImageBatchNorm(nn.Module):
    """A trained BatchNorm2d applied as the official pix2pix *test* script applies it:
    `test.py` does not call `model.eval()` unless `--eval` is given, so batch norm
    normalizes with the statistics of the batch, which is one image. Here each image is
    normalized with its own statistics (biased variance, as batch norm in training
    mode) and the learned affine, so a Triton batch of several requests gives each the
    answer it would get alone. Running statistics are kept, unused."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        self.weight = bn.weight
        self.bias = bn.bias
        self.eps = bn.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.instance_norm(x, weight=self.weight, bias=self.bias, eps=self.eps)


def per_image_batch_norm(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d in `model` (in place) by `PerImageBatchNorm`."""
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(model, name, PerImageBatchNorm(child))
        else:
            per_image_batch_norm(child)
    return model


class ImageGenerator(nn.Module):
    """Exported form: uint8 images [N, 3, H, W] RGB -> generated images float32
    [N, 3, H, W] in [-1, 1] (output `generated__0`); the gateway maps them to pixels
    as ``round((y + 1) * 127.5)`` clipped to [0, 255]."""

    def __init__(self, model: nn.Module, mean=GAN_MEAN, std=GAN_STD):
        super().__init__()
        self.normalize = Normalize(mean, std)  # x / 127.5 - 1 for mean = std = 0.5
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(images))


def _wrap(model, spec) -> nn.Module:
    # The spec option batch_norm: "per_image" is the official test script's behaviour
    # (batch statistics of one image), "running" uses the running statistics stored in
    # the checkpoint (model.eval()).
    if spec.settings.batch_norm == "per_image":
        model = per_image_batch_norm(model)
    return ImageGenerator(model, spec.mean, spec.std)


def build_cyclegan(num_classes: int = 0) -> nn.Module:
    """CycleGAN's resnet_9blocks generator; `num_classes` is ignored (no classes)."""
    return resnet_9blocks().eval()


def build_pix2pix(num_classes: int = 0) -> nn.Module:
    """pix2pix's unet_256 generator (batch norm); `num_classes` is ignored."""
    return unet_256().eval()


def _fixed_size_output(n_labels: int, height: int, width: int) -> tuple[TensorSpec, ...]:
    """pix2pix: float32 [3, H, W] at its (fixed) input size."""
    return contract("image_nchw_tanh", H=height, W=width)


def _any_size_output(n_labels: int, height: int, width: int) -> tuple[TensorSpec, ...]:
    """CycleGAN: float32 [3, -1, -1], the size of its (variable) input."""
    return contract("image_nchw_tanh", H=-1, W=-1)


# The official project's published generators (its scripts/download_cyclegan_model.sh
# and scripts/download_pix2pix_model.sh): name -> URL. Cached as <architecture>_<name>.pth,
# since both projects publish a sat2map, a map2sat and a facades_label2photo.
CYCLEGAN_URL = "http://efrosgans.eecs.berkeley.edu/cyclegan/pretrained_models/{}.pth"
CYCLEGAN_PUBLISHED = (
    "apple2orange", "orange2apple", "summer2winter_yosemite", "winter2summer_yosemite", "horse2zebra",
    "zebra2horse", "monet2photo", "style_monet", "style_cezanne", "style_ukiyoe", "style_vangogh", "sat2map",
    "map2sat", "cityscapes_photo2label", "cityscapes_label2photo", "facades_photo2label", "facades_label2photo",
    "iphone2dslr_flower",
)
PIX2PIX_URL = "http://efrosgans.eecs.berkeley.edu/pix2pix/models-pytorch/{}.pth"
PIX2PIX_PUBLISHED = ("edges2shoes", "sat2map", "map2sat", "facades_label2photo", "day2night")


def _published(architecture: str, url: str, names: tuple[str, ...]):
    def published() -> dict[str, Published]:
        return {name: Published(architecture, name, url.format(name), f"{architecture}_{name}.pth")
                for name in names}
    return published


register(Architecture(
    name="pix2pix", task="generation", build=build_pix2pix, wrap=_wrap, num_classes=0, labels_resource="",
    input_size=(PIX2PIX_SIZE, PIX2PIX_SIZE), resize_mode="stretch", mean=GAN_MEAN, std=GAN_STD,
    output_layout="image_nchw_tanh",
    options=layouts.get("image_nchw_tanh").option_strings(batch_norm="per_image"), output_specs=_fixed_size_output,
    adapt_state_dict=adapt_official_state_dict, published=_published("pix2pix", PIX2PIX_URL, PIX2PIX_PUBLISHED),
))
register(Architecture(
    # input_size is the nominal size for parity checks and warm-up; the exported input
    # is [3, -1, -1] (any size that is a multiple of 4, at least 8).
    name="cyclegan", task="generation", build=build_cyclegan, wrap=_wrap, num_classes=0, labels_resource="",
    input_size=(256, 256), resize_mode="none", mean=GAN_MEAN, std=GAN_STD,
    output_layout="image_nchw_tanh",
    options=layouts.get("image_nchw_tanh").option_strings(
        size_multiple=CYCLEGAN_SIZE_MULTIPLE, min_side=CYCLEGAN_MIN_SIDE, max_side=CYCLEGAN_MAX_SIDE),
    output_specs=_any_size_output, variable_input_size=True,
    adapt_state_dict=adapt_official_state_dict, published=_published("cyclegan", CYCLEGAN_URL, CYCLEGAN_PUBLISHED),
))
