"""Python-based Triton backend `torchscript`: runs `1/model.pt` through torch on CPU.

It only `torch.jit.load`s the file and runs one forward pass per group of same-shape
requests in a dynamic batch. The torchvision op shim is installed first, so detection
models that call torchvision ops load on CPU-only torch.
"""
import numpy as np

from service.embedded.backends._common import BatchedModel


class TritonPythonModel(BatchedModel):
    default_filename = "model.pt"

    def load(self, path):
        import torch

        from service.export import tvshim

        tvshim.install()
        self.torch = torch
        self.model = torch.jit.load(path, map_location="cpu").eval()

    def forward(self, batch, threads):
        torch = self.torch
        # The count CoreShare gives this run (start_triton's, from settings.torch_threads).
        if threads > 0 and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        with torch.inference_mode():
            out = self.model(*[torch.from_numpy(np.ascontiguousarray(a)) for a in batch])
        if isinstance(out, (tuple, list)):
            return [o.numpy() for o in out]
        return [out.numpy()]
