"""Python-based Triton backend `torchscript`: runs `1/model.pt` through torch on CPU.

It only `torch.jit.load`s the file and runs one forward pass per group of same-shape
requests in a dynamic batch. The torchvision op shim is installed first, so detection
models that call torchvision ops load on CPU-only torch.
"""
import os

import numpy as np

from service.embedded.backends._common import BatchedModel


class TritonPythonModel(BatchedModel):
    default_filename = "model.pt"

    def load(self, path):
        import torch

        from service.export import tvshim

        tvshim.install()
        # Set by the launcher (start_triton): this instance's share of the cores.
        threads = int(os.environ.get("CONVSERVE_TORCH_THREADS", "0"))
        if threads > 0:
            torch.set_num_threads(threads)
        self.torch = torch
        self.model = torch.jit.load(path, map_location="cpu").eval()

    def forward(self, batch):
        torch = self.torch
        with torch.inference_mode():
            out = self.model(*[torch.from_numpy(np.ascontiguousarray(a)) for a in batch])
        if isinstance(out, (tuple, list)):
            return [o.numpy() for o in out]
        return [out.numpy()]
