"""MLflow "model from code" for ONNX variants: a pyfunc over ONNX Runtime that returns the logits array.

``tasks.register`` passes this file's *path* to ``mlflow.pyfunc.log_model(python_model=...)``; MLflow
copies it next to the model and runs it on load, so a consumer of the registry needs mlflow, numpy
and onnxruntime, not optforge. Do not import this module: running it is its only use (it calls
``set_model``), and it must import nothing from optforge.

Why not the ``mlflow.onnx`` flavor: its pyfunc returns ``{output_name: array}`` for an array input
while the PyTorch flavor returns the array, so consumers would branch on the format. This one gives
``(N, num_classes)`` logits for a float32 array or a DataFrame, like the PyTorch flavor.
"""

import mlflow
import numpy as np


class OnnxLogits(mlflow.pyfunc.PythonModel):
    """Rows of float32 features in, logits out; the .onnx file is the ``onnx_model`` artifact."""

    def load_context(self, context):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        # One inter-op thread: these graphs are a single chain, parallel branches would only add overhead.
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            context.artifacts["onnx_model"], sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        x = np.ascontiguousarray(np.asarray(model_input, dtype=np.float32))
        return self.session.run(None, {self.input_name: x})[0]


mlflow.models.set_model(OnnxLogits())
