"""Generation entries of the shared end-to-end stack (see conftest.py):

- `cyclegan`: from a checkpoint in the official `latest_net_G.pth` layout, including the
  stale InstanceNorm statistics that pre-0.4 official checkpoints carry;
- `cyclegan_onnx`: the same weights exported to ONNX (variable height and width);
- `pix2pix`: unet_256 from a batch-norm checkpoint (as facades_label2photo), 256x256;
- `gen_file`: a small generator brought with `convserve export --from-file --task
  generation` (float input: the gateway normalizes to [-1, 1]).

Checkpoints are seeded torch-default initializations (no weights can be downloaded);
their outputs vary with the input (a pixel std of tens of grey levels), so comparisons
against eager cannot pass by accident.
"""
from __future__ import annotations

from pathlib import Path

GEN_FILE_SIZE = 64


def official_cyclegan_checkpoint(path: Path, seed: int = 7) -> Path:
    """A resnet_9blocks state_dict as the official code saves it, plus InstanceNorm
    running_mean/running_var/num_batches_tracked (pre-0.4 checkpoints), which the
    official `load_networks` and our loader drop."""
    import torch

    from service.export.zoo import generation as gen

    torch.manual_seed(seed)
    model = gen.resnet_9blocks()
    state = dict(model.state_dict())
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.InstanceNorm2d):
            state[f"{name}.running_mean"] = torch.zeros(module.num_features)
            state[f"{name}.running_var"] = torch.ones(module.num_features)
            state[f"{name}.num_batches_tracked"] = torch.tensor(0)
    torch.save(state, path)
    return path


def pix2pix_checkpoint(path: Path, seed: int = 11) -> Path:
    import torch

    from service.export.zoo import generation as gen

    torch.manual_seed(seed)
    model = gen.unet_256()
    with torch.no_grad():  # non-trivial batch-norm statistics (unused per image, but loaded)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    torch.save(model.state_dict(), path)
    return path


def small_generator_file(path: Path, seed: int = 5) -> Path:
    """A TorchScript generator taking float [N, 3, S, S] in [-1, 1] (a resnet generator
    with 2 blocks and 16 filters: the same layers as CycleGAN's, cheap)."""
    import torch

    from service.export.zoo import generation as gen

    torch.manual_seed(seed)
    model = gen.ResnetGenerator(3, 3, 16, norm_layer=gen.get_norm_layer("instance"), n_blocks=2).eval()
    torch.jit.save(torch.jit.script(model), str(path))
    return path


def export(repo: Path, root: Path, checkpoints: dict) -> None:
    from service.cli import main
    from service.export.repository import export_model

    checkpoints["cyclegan"] = official_cyclegan_checkpoint(root / "cyclegan_latest_net_G.pth")
    # Parity is checked at 64x64 (--input-size): served sizes vary anyway.
    export_model("cyclegan", repo, weights=checkpoints["cyclegan"], input_size=64, max_batch_size=4)
    # The same weights as ONNX with variable height and width, served by onnxruntime.
    export_model("cyclegan", repo, fmt="onnx", weights=checkpoints["cyclegan"], input_size=32, max_batch_size=4)
    checkpoints["pix2pix"] = pix2pix_checkpoint(root / "pix2pix_latest_net_G.pth")
    export_model("pix2pix", repo, weights=checkpoints["pix2pix"], max_batch_size=2)
    checkpoints["gen_file"] = small_generator_file(root / "gen_file.pt")
    code = main(["export", "--repo", str(repo), "--from-file", str(checkpoints["gen_file"]), "--task", "generation",
                 "--name", "gen_file", "--input-size", str(GEN_FILE_SIZE)])
    assert code == 0, "convserve export --from-file --task generation failed"
