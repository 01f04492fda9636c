"""Published weights by name: `--weights IMAGENET1K_V1` (torchvision's weights API) or
`--weights horse2zebra` (the pix2pix/CycleGAN project's generators).

Files live in torch.hub's download cache, ``torch.hub.get_dir()/checkpoints``
(``$TORCH_HOME/hub/checkpoints``, by default ``~/.cache/torch/hub/checkpoints``), where
torchvision's own ``weights.get_state_dict()`` looks for them: a file is downloaded
once, through torch.hub, and checked against the sha256 prefix its name carries
(``mobilenet_v2-b0353104.pth``), on download as torch.hub does and also when it is read
back from the cache (a truncated or wrong file there is refused, naming its path).
Offline, the error names the URL and the exact path to put the file at.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Callable

import torch

from . import ExportError
from .zoo import DEFAULT_WEIGHTS as DEFAULT  # noqa: F401  (the CLI names the default as hub.DEFAULT)
from .zoo import Architecture, Published

# The cache's files are read in pieces of this size to hash them.
_HASH_CHUNK = 1 << 20


def cache_dir() -> Path:
    """torch.hub's checkpoint cache, as torchvision's weights API uses it; read each
    time, so that ``TORCH_HOME`` set at run time counts."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def hash_prefix(filename: str) -> str | None:
    """The sha256 prefix in a torch.hub file name (``-<hex>.``), or None."""
    match = torch.hub.HASH_REGEX.search(filename)
    return match.group(1) if match and match.group(1) else None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def lookup(arch: Architecture, weights: str | Path) -> Published | None:
    """The published weights that `weights` names for `arch` (its enum name, or
    ``DEFAULT``), or None when it names none: then it is a checkpoint path. A name
    wins over a file of that name in the working directory (write ``./NAME`` for the
    file)."""
    if arch.published is None or not isinstance(weights, str):
        return None
    return arch.published().get(weights)


def known_names(arch: Architecture) -> list[str]:
    return sorted(arch.published()) if arch.published is not None else []


def cached(arch: Architecture, name: str) -> Path | None:
    """The cache file of `arch`'s published weights `name` when it is there, else None
    (also when `arch` publishes no such weights). Nothing is downloaded or hashed."""
    published = lookup(arch, name)
    path = cache_dir() / published.filename if published is not None else None
    return path if path is not None and path.is_file() else None


def fetch(published: Published, download: Callable[..., None] | None = None) -> Path:
    """The cached file of `published`, downloaded first when it is not in the cache
    (with `download`, default `torch.hub.download_url_to_file`).

    Raises ExportError when the cached file's sha256 does not start with the prefix in
    its name, and when the download fails (offline: the message has the URL and the
    path to put the file at)."""
    path = cache_dir() / published.filename
    expected = hash_prefix(published.filename)
    what = f"{published.architecture} weights {published.name}"
    if path.is_file():
        if expected is not None and not sha256(path).startswith(expected):
            raise ExportError(f"{what}: the cached file {path} does not have the sha256 its name says "
                              f"({expected}...); delete it, then export again to download {published.url}")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # torch.hub downloads to a temporary file, checks the hash prefix, then renames.
        download = download or torch.hub.download_url_to_file
        download(published.url, str(path), hash_prefix=expected, progress=sys.stderr.isatty())
    except Exception as exc:  # offline (URLError, OSError), or a hash mismatch (RuntimeError)
        raise ExportError(f"{what}: cannot download {published.url} ({exc}). Offline, download it elsewhere and "
                          f"put it at {path} (the torch.hub cache; TORCH_HOME moves it)") from exc
    return path
