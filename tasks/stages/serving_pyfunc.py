"""MLflow "model from code": the pyfunc every registered ONNX variant, and every PyTorch variant of image
or text data, loads through. It takes what a user has and returns the logits array.

``tasks.stages.register`` passes this file's *path* to ``mlflow.pyfunc.log_model(python_model=...)``; MLflow
copies it next to the model and runs it on load, so a consumer of the registry needs mlflow, numpy and
the runtime (onnxruntime, or torch for an exported PyTorch program; transformers for text), not
optforge and not the training config. Do not import this module: running it is its only use (it
calls ``set_model``), and it must import nothing from optforge.

Inputs, by the ``contract`` artifact's kind:
- table: rows of float32 features (an array or a DataFrame), as before;
- image: an (N, C, H, W) float array, already resized, cropped and normalised as the contract's
  ``preprocessing`` says (also in the model version's description);
- text: raw strings (a list, a Series, or a DataFrame whose first column holds them), tokenized with
  the ``tokenizer`` artifact, the one the data was tokenized with, to the data's ``max_length``.

Why not the ``mlflow.onnx`` flavor: its pyfunc returns ``{output_name: array}`` for an array input
while the PyTorch flavor returns the array, so consumers would branch on the format.
"""

import json

import mlflow
import numpy as np


class Logits(mlflow.pyfunc.PythonModel):
    """Raw inputs in (see the module docstring), (N, num_classes) logits out."""

    def load_context(self, context):
        artifacts = context.artifacts
        self.contract = json.loads(open(artifacts["contract"]).read()) if "contract" in artifacts else {"kind": "table"}
        self.names = [t["name"] for t in self.contract.get("inputs", [])] or None
        self.tokenizer = None
        if "tokenizer" in artifacts:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(artifacts["tokenizer"], local_files_only=True)
        if "onnx_model" in artifacts:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.inter_op_num_threads = 1  # these graphs are mostly one chain: parallel branches only add overhead
            self.session = ort.InferenceSession(artifacts["onnx_model"], sess_options=opts,
                                                providers=["CPUExecutionProvider"])
            self.names = [i.name for i in self.session.get_inputs()]
            self.program = None
        else:
            import torch

            self.program = torch.export.load(artifacts["torch_program"]).module()
            self.session = None

    def _inputs(self, model_input) -> dict:
        kind = self.contract["kind"]
        if kind == "text":
            if hasattr(model_input, "iloc") and getattr(model_input, "ndim", 1) == 2:
                model_input = model_input.iloc[:, 0]
            texts = [str(t) for t in (model_input.tolist() if hasattr(model_input, "tolist") else list(model_input))]
            pre = self.contract.get("preprocessing", {})
            enc = self.tokenizer(texts, truncation=True, max_length=pre.get("max_length", 128), padding="max_length",
                                 return_tensors="np")
            return {n: np.asarray(enc[n], dtype=np.int64) for n in self.names}
        x = np.ascontiguousarray(np.asarray(model_input, dtype=np.float32))
        return {self.names[0]: x}

    def predict(self, context, model_input, params=None) -> np.ndarray:
        feed = self._inputs(model_input)
        if self.session is not None:
            return self.session.run(None, feed)[0]
        import torch

        with torch.inference_mode():
            return self.program(*(torch.from_numpy(feed[n]) for n in self.names)).float().numpy()


mlflow.models.set_model(Logits())
