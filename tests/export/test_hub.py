"""Published weights by name: the torch.hub cache, its hash check, the offline error,
and the pix2pix/CycleGAN project's generators. Nothing here reaches the network: the
download is replaced where a test needs one."""
from __future__ import annotations

import hashlib
import urllib.error
from pathlib import Path

import pytest
import torch

from service import cli
from service.export import ExportError, hub, zoo
from service.export.repository import export_model
from service.export.zoo.generation import resnet_9blocks


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty torch.hub cache for this test; returns its checkpoints directory."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def offline(url, dst, hash_prefix=None, progress=True):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


def published_file(directory: Path, content: bytes, stem: str = "tiny") -> hub.Published:
    """A file named as torch.hub names them (`<stem>-<sha256 prefix>.pth`) and its entry."""
    name = f"{stem}-{hashlib.sha256(content).hexdigest()[:8]}.pth"
    return hub.Published("tiny", "V1", f"https://example.invalid/{name}", name)


def test_the_cache_is_torch_hubs(torch_home):
    assert hub.cache_dir() == torch_home == Path(torch.hub.get_dir()) / "checkpoints"
    assert hub.hash_prefix("mobilenet_v2-b0353104.pth") == "b0353104"
    assert hub.hash_prefix("mnasnet0.5_top1_67.823-3ffadce67e.pth") == "3ffadce67e"
    assert hub.hash_prefix("cyclegan_horse2zebra.pth") is None


def test_a_cached_file_is_used_when_its_hash_matches(torch_home):
    content = b"weights"
    entry = published_file(torch_home, content)
    torch_home.mkdir(parents=True)
    (torch_home / entry.filename).write_bytes(content)
    assert hub.fetch(entry, download=offline) == torch_home / entry.filename


def test_a_cached_file_with_the_wrong_hash_is_refused_naming_it(torch_home):
    entry = published_file(torch_home, b"weights")
    torch_home.mkdir(parents=True)
    (torch_home / entry.filename).write_bytes(b"truncated")
    with pytest.raises(ExportError, match="does not have the sha256") as info:
        hub.fetch(entry, download=offline)
    assert str(torch_home / entry.filename) in str(info.value)


def test_a_download_goes_into_the_cache_with_the_hash_prefix(torch_home):
    content = b"weights"
    entry = published_file(torch_home, content)
    calls = []

    def download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, dst, hash_prefix))
        Path(dst).write_bytes(content)

    path = hub.fetch(entry, download=download)
    assert calls == [(entry.url, str(torch_home / entry.filename), hub.hash_prefix(entry.filename))]
    assert path.read_bytes() == content


def test_offline_and_not_cached_names_the_url_and_the_exact_path(torch_home, monkeypatch, capsys):
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    code = cli.main(["export", "mobilenet_v2", "--weights", "IMAGENET1K_V1", "--repo", str(torch_home.parent / "r")])
    err = capsys.readouterr().err
    assert code == 2
    assert "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth" in err
    assert str(torch_home / "mobilenet_v2-b0353104.pth") in err


def test_default_resolves_to_torchvisions_recommended_weights(torch_home, monkeypatch):
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ExportError, match="mobilenet_v2-7ebf99e0.pth"):  # IMAGENET1K_V2
        export_model("mobilenet_v2", torch_home.parent / "r", weights="DEFAULT")


def test_an_unknown_name_lists_the_published_ones(tmp_path):
    with pytest.raises(ExportError, match="IMAGENET1K_V1") as info:
        export_model("mobilenet_v2", tmp_path, weights="IMAGENET1K_V9")
    assert "DEFAULT" in str(info.value) and "no such checkpoint file" in str(info.value)


def test_generators_publish_the_official_projects_names():
    cyclegan, pix2pix = zoo.get("cyclegan").published(), zoo.get("pix2pix").published()
    assert cyclegan["horse2zebra"].url == (
        "http://efrosgans.eecs.berkeley.edu/cyclegan/pretrained_models/horse2zebra.pth")
    assert pix2pix["facades_label2photo"].url == (
        "http://efrosgans.eecs.berkeley.edu/pix2pix/models-pytorch/facades_label2photo.pth")
    assert {"style_monet", "monet2photo", "summer2winter_yosemite", "iphone2dslr_flower"} <= set(cyclegan)
    assert set(pix2pix) == {"edges2shoes", "sat2map", "map2sat", "facades_label2photo", "day2night"}
    # Both projects publish a sat2map: their cache files differ.
    assert cyclegan["sat2map"].filename != pix2pix["sat2map"].filename


def test_a_cached_generator_exports_by_name(torch_home):
    torch.manual_seed(0)
    torch_home.mkdir(parents=True)
    torch.save(resnet_9blocks().state_dict(), torch_home / "cyclegan_horse2zebra.pth")
    result = export_model("cyclegan", torch_home.parent / "r", weights="horse2zebra", input_size=32)
    assert result.spec.architecture == "cyclegan"


def test_serves_default_set_takes_cached_published_weights_else_seeded(torch_home, monkeypatch, capsys):
    """`--published-if-cached` (what `convserve serve` exports its default set with) never
    downloads: DEFAULT weights when their file is cached, seeded otherwise; it says which,
    and the spec records it."""
    from service.spec import SEEDED

    repo = torch_home.parent / "r"
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    assert cli.main(["export", "squeezenet1_1", "--published-if-cached", "--repo", str(repo)]) == 0
    said = capsys.readouterr()
    assert "squeezenet1_1: seeded random weights" in said.out
    assert "no --weights given" not in said.err  # said once, with its reason, not again as a warning
    assert f"{SEEDED}" in (repo / "squeezenet1_1" / "config.pbtxt").read_text()

    # A stand-in file under torchvision's name (its hash is not the real one's).
    monkeypatch.setattr(hub, "hash_prefix", lambda filename: None)
    torch_home.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(zoo.get("squeezenet1_1").build(1000).state_dict(), torch_home / "squeezenet1_1-b8a52dc0.pth")
    assert cli.main(["export", "squeezenet1_1", "--published-if-cached", "--repo", str(repo), "--name", "p"]) == 0
    assert "squeezenet1_1: published weights IMAGENET1K_V1" in capsys.readouterr().out
    result_config = (repo / "p" / "config.pbtxt").read_text()
    assert '"IMAGENET1K_V1"' in result_config

    # Architectures without published weights say so.
    assert cli.main(["export", "unet", "--published-if-cached", "--repo", str(repo), "--input-size", "32"]) == 0
    assert "unet: seeded random weights (it has no default published weights" in capsys.readouterr().out

    # Without --published-if-cached the library's warning says it, as one line of the command's.
    assert cli.main(["export", "unet", "--repo", str(repo), "--input-size", "32", "--name", "u2"]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "seeded random weights" in line]
    assert len(warned) == 1 and warned[0].startswith("convserve export: warning: unet: no --weights given"), warned


def test_checkpoint_files_are_recorded_by_name_and_hash(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "mine.pth"
    torch.save(zoo.get("squeezenet1_1").build(10).state_dict(), path)
    result = export_model("squeezenet1_1", tmp_path / "r", weights=path, input_size=64)
    assert result.spec.weights == f"mine.pth sha256:{hashlib.sha256(path.read_bytes()).hexdigest()[:12]}"


def test_detectors_publish_torchvisions_coco_weights(torch_home, monkeypatch):
    published = zoo.get("fasterrcnn_resnet50_fpn").published()
    assert published["DEFAULT"] is published["COCO_V1"]
    assert published["COCO_V1"].filename == "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth"
    assert list(published["COCO_V1"].labels) == zoo.read_labels("coco_categories.txt")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ExportError, match="maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"):
        export_model("maskrcnn_resnet50_fpn", torch_home.parent / "r", weights="COCO_V1")
