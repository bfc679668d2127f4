"""ONNX export through torch's dynamo exporter: onnxruntime gives torch's outputs for ViT, CLIP's zero-shot
classifier, AST and SAM's encoder + decoder with a point prompt (tiny models; an export takes ~10 s on a
loaded CPU, so only the merged ViT runs by default and the others with ``pytest -m slow``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import zoo
from tests.export_helpers import (
    crash_at_rename,
    folder_files,
    library_model,
    train_a_little,
    zoo_backbone,
)
from zoo.export import ExportError
from zoo.export.onnx import export_onnx, graph_of

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def adapted(family, tmp_path, method="lora"):
    opts = {"rank": 2, "alpha": 4.0, "targets": ["q", "v", "fc1"]} if method == "lora" else {}
    if family in ("vit", "ast"):
        model = zoo.ImageClassifier(zoo_backbone(family, library_model(family), tmp_path), 5)
    elif family == "clip":
        from zoo.zeroshot import CLIPClassifier

        bb = zoo_backbone("clip", library_model("clip"), tmp_path)
        zoo.apply_adapter(bb, method, **opts)
        model = CLIPClassifier(bb, ["cat", "dog", "car"], cache_dir=tmp_path)
    else:
        from tests.seg_helpers import save_reference_sam, tiny_segmenter

        _, f = save_reference_sam(tmp_path / "sam.pth", num_multimask_outputs=3)
        model = tiny_segmenter(num_classes=1, weights=str(f), mode="prompted")
    if family != "clip":
        zoo.apply_adapter(model, method, **opts)
    train_a_little(model)
    return model.eval()


def run_both(model, path, batch=None):
    module, args, names, _ = graph_of(model)
    if batch:  # another batch size than the one exported with: the batch axis is dynamic
        args = (torch.randn(batch, *args[0].shape[1:]),)
    with torch.no_grad():
        want = module(*args)
    want = want if isinstance(want, tuple) else (want,)
    got = ort.InferenceSession(str(path)).run(None, {n: a.numpy() for n, a in zip(names, args)})
    return [w.numpy() for w in want], got, args


@pytest.mark.parametrize("family,merged", [("vit", None), pytest.param("sam", None, marks=pytest.mark.slow),
                                           pytest.param("vit", False, marks=pytest.mark.slow),
                                           pytest.param("clip", None, marks=pytest.mark.slow),
                                           pytest.param("ast", None, marks=pytest.mark.slow)])
def test_onnxruntime_gives_torch_outputs(family, merged, tmp_path):
    model = adapted(family, tmp_path)
    before = {k: v.clone() for k, v in zoo.adapter_state_dict(model).items()}
    export_onnx(model, tmp_path / "m.onnx", merged=merged)
    assert zoo.adapters_of(model)[0].name == "lora" and not zoo.adapters_of(model)[0].merged  # unchanged
    assert all(torch.equal(v, zoo.adapter_state_dict(model)[k]) for k, v in before.items())
    for batch in (None, 3) if family != "sam" else (None,):
        want, got, args = run_both(model, tmp_path / "m.onnx", batch)
        assert len(want) == len(got)
        for w, g in zip(want, got):
            assert w.shape == g.shape and np.abs(w - g).max() < 1e-4, np.abs(w - g).max()
    if family == "sam":  # the graph is the segmenter's own prompted path
        with torch.no_grad():
            seg = model(args[0], points=(args[1][:, None], args[2][:, None]))
        assert torch.allclose(seg, torch.from_numpy(got[0]), atol=1e-4)


@pytest.mark.slow  # an AST export takes ~10 s of one core, as the AST case above
@pytest.mark.parametrize("merged", [None, False])
def test_ast_layernorm_linear_head_in_onnxruntime(merged, tmp_path):
    """AST with its own head (LayerNorm, then Linear): onnxruntime gives torch's logits, and those are the
    LayerNorm + Linear of the pooled feature (so the graph did not lose the LayerNorm)."""
    import torch.nn.functional as F

    model = zoo.LayerNormLinearClassifier(zoo_backbone("ast", library_model("ast"), tmp_path), 5)
    zoo.apply_adapter(model, "lora", rank=2, alpha=4.0, targets=["q", "v", "fc1"])
    train_a_little(model)  # γ off 1, β off 0, LoRA's B off zero
    model.eval()
    export_onnx(model, tmp_path / "m.onnx", merged=merged)
    for batch in (None, 3):
        want, got, args = run_both(model, tmp_path / "m.onnx", batch)
        assert len(got) == 1 and want[0].shape == got[0].shape == (args[0].shape[0], 5)
        assert np.abs(want[0] - got[0]).max() < 1e-4, np.abs(want[0] - got[0]).max()
        ln, fc = model.head
        with torch.no_grad():
            by_hand = F.linear(F.layer_norm(model.backbone(args[0]), (32,), ln.weight, ln.bias, 1e-5), fc.weight, fc.bias)
        assert np.abs(by_hand.numpy() - got[0]).max() < 1e-4


def test_merged_onnx_refuses_a_method_that_cannot_merge(tmp_path):
    model = zoo.ImageClassifier(zoo_backbone("vit", library_model("vit"), tmp_path), 5)
    zoo.apply_adapter(model, "vpt", num_tokens=2)
    with pytest.raises(ExportError, match="method 'vpt' cannot be merged"):
        export_onnx(model, tmp_path / "m.onnx", merged=True)


@pytest.mark.slow
def test_a_method_that_cannot_merge_is_exported_with_its_own_ops(tmp_path):
    model = zoo.ImageClassifier(zoo_backbone("vit", library_model("vit"), tmp_path), 5)
    zoo.apply_adapter(model, "vpt", num_tokens=2)
    train_a_little(model)
    export_onnx(model.eval(), tmp_path / "m.onnx")  # merged=None: vpt cannot merge, so its prompts are in the graph
    for batch in (None, 3):
        want, got, _ = run_both(model, tmp_path / "m.onnx", batch)
        assert np.abs(want[0] - got[0]).max() < 1e-4


def test_a_failed_re_export_leaves_the_previous_graph_or_none_never_a_mixed_set(tmp_path, monkeypatch):
    """model.onnx was written by torch straight into place: a full disk midway left half a graph where the
    previous one was, and its weights file (model.onnx.data, past 2 GB) was written apart from it. Now the
    set is staged and model.onnx renamed in last: a failed write leaves the previous export whole, a crash
    at the last rename no model.onnx (onnxruntime refuses the folder) beside the new weights file, and a
    clean re-export removes a model.onnx.data it does not write and is byte-identical to a fresh one.
    torch's exporter itself is replaced by a stand-in for the failures (what is tested is the writing)."""
    from pathlib import Path

    model = adapted("vit", tmp_path)
    new = folder_files(export_onnx(model, tmp_path / "new" / "model.onnx").parent)
    assert sorted(new) == ["model.onnx"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"the previous export's graph")
    old = folder_files(out)

    class Program:  # what torch.onnx.export returns, writing `graph` (and a weights file beside it) or failing
        def __init__(self, fail=False):
            self.fail = fail

        def save(self, dest):
            with open(dest, "wb") as f:
                f.write(new["model.onnx"][:100])
                if self.fail:
                    raise OSError(28, "No space left on device")
                f.write(new["model.onnx"][100:])
            Path(f"{dest}.data").write_bytes(b"the weights, past 2 GB")

    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: Program(fail=True))
    with pytest.raises(OSError) as e:
        export_onnx(model, out / "model.onnx")
    assert e.value.errno == 28 and e.value.filename == str(out / "model.onnx")
    assert folder_files(out) == old  # the previous graph, whole, and no temporary folder

    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: Program())
    crash_at_rename(monkeypatch, out / "model.onnx")
    with pytest.raises(OSError, match=rf"{out} is left without model.onnx, an incomplete set that readers refuse"):
        export_onnx(model, out / "model.onnx")
    monkeypatch.undo()
    assert folder_files(out) == {"model.onnx.data": b"the weights, past 2 GB"}  # the new set but its graph
    with pytest.raises(Exception, match="model.onnx"):
        ort.InferenceSession(str(out / "model.onnx"))

    export_onnx(model, out / "model.onnx")
    assert folder_files(out) == new
