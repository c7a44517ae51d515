"""Early exit served two ways: one ONNX graph with If nodes, or one ONNX file per segment driven from Python
(a script, not a test).

Takes an early-exit model folder that a run wrote (``<workdir>/early_exit/<key>/model``) and the run's data
folder (``<workdir>/data/<key>``). Times, at batch 1 over every test row in turn (the real mix of exits),
ONNX Runtime on: the full model (the backbone alone, no exits), the If graph that optforge exports, and
the segmented form (segment k = the blocks after exit k-1 up to exit k, plus its head; Python checks the
confidence between segments). Prints mean and p50 latency, accuracy and the share leaving at each exit.
Zoo models with one input (the MLP, CNN, DSCNN).

    .venv/bin/python bench/early_exit.py --model WORK/early_exit/KEY/model --data WORK/data/KEY [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    from optforge.flows.environment import quiet_libraries

    quiet_libraries()  # before torch is imported: torch reads TORCH_LOGS then
    import numpy as np
    import torch
    from torch import nn

    from optforge.tasks.techniques.data.data import load_splits
    from optforge.tasks.techniques.measurement.benchmark import cpu_model, time_calls
    from optforge.tasks.techniques.models.rebuild import load_model
    from optforge.tasks.techniques.onnx.export import ExportConfig, export_onnx
    from optforge.tasks.techniques.onnx.ort_session import tuned_session

    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model)
    splits = load_splits(args.data)
    name = splits.contract.names[0]
    split, t = model._split, float(model.threshold)
    ends = [*model.exits, len(split.blocks) - 1]

    class Segment(nn.Module):
        """Blocks ``start..end`` and the head at ``end``; the first segment also prepares the raw input."""

        def __init__(self, start: int, end: int):
            super().__init__()
            self.start, self.end = start, end

        def forward(self, h):
            if self.start == 0:
                (h,) = split.prepare({name: h})
            for block in split.blocks[self.start:self.end + 1]:
                h = block(h)
            head = model.heads[str(self.end)] if str(self.end) in model.heads else split.final  # noqa: SIM401
            return h, head(h)

    class Backbone(nn.Module):
        def forward(self, x):
            return model.base(x)

    rows = [splits.test.take([i]) for i in range(len(splits.test))]
    labels = np.asarray(splits.test.labels)
    with tempfile.TemporaryDirectory() as tmp:
        contract = splits.contract
        full = tuned_session(export_onnx(Backbone().eval(), contract, Path(tmp) / "full.onnx", ExportConfig()),
                             args.threads)
        graph = tuned_session(export_onnx(model, contract, Path(tmp) / "if.onnx", ExportConfig()), args.threads)
        segments, start = [], 0
        x1 = torch.as_tensor(rows[0][name])
        h = x1
        for k, end in enumerate(ends):
            seg = Segment(start, end).eval()
            path = Path(tmp) / f"seg{k}.onnx"  # batch 1 only: a static shape is enough here
            torch.onnx.export(seg, (h,), str(path), dynamo=True, input_names=["h"], output_names=["state", "logits"])
            segments.append(tuned_session(path, args.threads))
            with torch.no_grad():  # not inference_mode: the next export traces this tensor
                h, _ = seg(h)
            start = end + 1

        exits_taken = []

        def segmented(row):
            h = row[name]
            for k, session in enumerate(segments):
                h, logits = session.run(None, {session.get_inputs()[0].name: h})
                e = np.exp(logits - logits.max(-1, keepdims=True))
                if k == len(segments) - 1 or (e / e.sum(-1, keepdims=True)).max() >= t:
                    exits_taken.append(k)
                    return logits
            return logits

        def run(session):
            return lambda row: session.run(None, row)[0]

        print(f"{cpu_model()}, {args.threads} thread(s), threshold {t:g}, exits after blocks {model.exits}, "
              f"{len(rows)} test rows at batch 1")
        print(f"{'form':22} {'accuracy %':>10} {'mean ms':>9} {'p50 ms':>8}")
        for label, predict in [("full model (no exits)", run(full)), ("If graph (optforge)", run(graph)),
                               ("segmented (Python)", segmented)]:
            predicted = np.array([predict(r).argmax(-1)[0] for r in rows])
            ms = time_calls(predict, rows, warmup=20) * 1e3
            print(f"{label:22} {100 * (predicted == labels).mean():10.2f} {ms.mean():9.4f} {np.median(ms):8.4f}")
        shares = np.bincount(exits_taken[-len(rows):], minlength=len(segments)) / len(rows)
        print("share leaving at each exit (the model's own head last):", ", ".join(f"{s:.1%}" for s in shares))



if __name__ == "__main__":
    main()
