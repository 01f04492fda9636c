"""Python-based Triton backend `onnxruntime`: runs `1/model.onnx` with ONNX Runtime on CPU."""
import os

from service.embedded.backends._common import BatchedModel

# The largest model (file and external data) that gets a second session for adaptive
# threads (see load).
TWO_SESSIONS_MAX_BYTES = 256 << 20


def model_bytes(path: str) -> int:
    """The size of the ONNX model at `path` with its external data: every file of its
    version folder (the exporter puts nothing else there) but a TorchScript entry's
    own `model.pt`, which its ONNX companion sits beside."""
    folder = os.path.dirname(path)
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            if not (root == folder and name == "model.pt"):
                total += os.path.getsize(os.path.join(root, name))
    return total


class TritonPythonModel(BatchedModel):
    default_filename = "model.onnx"

    def load(self, path):
        import onnxruntime as ort

        def session(threads: int):
            options = ort.SessionOptions()
            if threads > 0:
                options.intra_op_num_threads = threads
            if self.cores.adaptive:
                # Its threads stop spinning when a run ends, instead of holding cores
                # that another instance's run may need.
                options.add_session_config_entry("session.force_spinning_stop", "1")
            return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

        # An ORT session's thread count is fixed, so adaptive threads (CoreShare) hold
        # one session per count: every core for a lone caller, no oversubscription under
        # load, for a second copy of the weights in memory (measured for resnet18: 168 ->
        # 240 MB per stub). Past TWO_SESSIONS_MAX_BYTES the model keeps one session, at
        # the shared count.
        shared = session(self.cores.shared)
        two = self.cores.adaptive and model_bytes(path) <= TWO_SESSIONS_MAX_BYTES
        self.sessions = {self.cores.shared: shared, self.cores.alone: session(self.cores.alone) if two else shared}
        self.feed_names = [i.name for i in shared.get_inputs()]
        self.fetch_names = [o.name for o in shared.get_outputs()]

    def forward(self, batch, threads):
        return self.sessions[threads].run(self.fetch_names, dict(zip(self.feed_names, batch)))
