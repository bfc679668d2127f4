"""``python -m zoo export NAME_OR_RUN --format peft|merged|onnx --out DIR``: the command behind docs/export.md."""
from __future__ import annotations

import os
from pathlib import Path

from torch import nn

FORMATS = ("peft", "merged", "onnx")


def load_model(spec: str, weights: str | os.PathLike | None = None) -> nn.Module:
    """A zoo entry name, an artifact folder (``adapter.json``) or a finished run folder (``RUN/adapter/``),
    rebuilt with its backbone and head (:func:`zoo.from_zoo`); ``weights``: the base weights file."""
    from zoo.hub import from_zoo

    run = Path(spec).expanduser() / "adapter"
    if (run / "adapter.json").is_file():
        spec = str(run)
    return from_zoo(spec, weights=weights)


def run_export(spec: str, out: str | os.PathLike, fmt: str | None = None, merged: bool = False,
               keep_modules: bool = False, weights: str | os.PathLike | None = None, note=print) -> Path:
    """Export ``spec`` to ``out``; ``fmt`` defaults to ``merged`` with ``merged=True``, else ``peft``.

    ``peft`` + ``merged``: a method peft cannot express is written merged into the base weights (the
    ``merged`` format) instead, with a note; ``onnx``: ``merged`` insists on merging, ``keep_modules``
    exports the adapters' own ops. Returns the file or folder written.
    """
    from zoo.export import ExportError, export_merged, export_onnx, export_peft

    fmt = fmt or ("merged" if merged else "peft")
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")
    model = load_model(spec, weights)
    out = Path(out)
    if fmt == "peft":
        try:
            return export_peft(model, out)
        except ExportError as e:
            if not merged or "has no peft equivalent" not in str(e):
                raise
            note(f"{e.args[0].split(';')[0]}: writing it merged into the base weights (--format merged) instead")
            return export_merged(model, out)
    if fmt == "merged":
        return export_merged(model, out, keep_modules=keep_modules)
    return export_onnx(model, out / "model.onnx", merged=True if merged else (False if keep_modules else None))
