"""Python-based Triton backend `onnxruntime`: runs `1/model.onnx` with ONNX Runtime on CPU."""
import os

from service.embedded.backends._common import BatchedModel


class TritonPythonModel(BatchedModel):
    default_filename = "model.onnx"

    def load(self, path):
        import onnxruntime as ort

        options = ort.SessionOptions()
        # Set by the launcher (start_triton): this instance's share of the cores.
        threads = int(os.environ.get("CONVSERVE_TORCH_THREADS", "0"))
        if threads > 0:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.feed_names = [i.name for i in self.session.get_inputs()]
        self.fetch_names = [o.name for o in self.session.get_outputs()]

    def forward(self, batch):
        return self.session.run(self.fetch_names, dict(zip(self.feed_names, batch)))
