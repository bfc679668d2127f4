"""Using an adapter elsewhere: the peft format both ways, merged library checkpoints and ONNX.

* :func:`export_peft` / :func:`load_peft`: a zoo LoRA as a peft adapter for the base model timm,
  open_clip or transformers builds, and back (:mod:`zoo.export.peft`);
* :func:`export_merged`: the adapted backbone (+ head) merged into plain weights that timm, open_clip
  or transformers load without zoo (:mod:`zoo.export.merged`);
* :func:`export_onnx`: an inference graph through torch's dynamo ONNX exporter (:mod:`zoo.export.onnx`).

``python -m zoo export NAME_OR_RUN --format peft|merged|onnx --out DIR`` runs them (docs/export.md).
"""
from zoo.export.merged import export_merged
from zoo.export.naming import ExportError
from zoo.export.onnx import export_onnx
from zoo.export.peft import export_peft, load_peft

__all__ = ["ExportError", "export_merged", "export_onnx", "export_peft", "load_peft"]
