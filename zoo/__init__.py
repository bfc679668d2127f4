"""Adapter Zoo: parameter-efficient fine-tuning of vision, audio and scientific backbones.

A plain PyTorch library (no Lightning, no Hydra)::

    import zoo
    bb = zoo.create_backbone("vit", model="vit_tiny_patch16_224", pretrained=False, img_size=32)
    zoo.apply_adapter(bb, "lora", rank=4, targets=["q", "v"])
    trainable, total = zoo.count_parameters(bb)
    zoo.save_adapter(bb, "out/dir"); zoo.load_adapter(other_bb, "out/dir")
    zoo.merge_adapters(bb, unload=True)
    model = zoo.from_zoo("vit-demo-lora")  # a published adapter, ready for inference
    zoo.export_peft(model, "out/peft")  # the same adapter for peft on timm / open_clip / transformers
    served = zoo.MultiAdapter.from_artifacts({"cats": "runs/cats", "cars": "runs/cars"})  # adapters share a batch
"""
__version__ = "0.1.0"

# The public names, imported on first use (PEP 562): ``python -m zoo --help`` / ``list`` and the model-zoo
# functions answer without importing torch and timm, which take seconds. ``import zoo; zoo.apply_adapter``
# and ``from zoo import apply_adapter`` work as with eager imports.
_PUBLIC: dict[str, tuple[str, ...]] = {
    "zoo.activation_checkpoint": ("checkpoint_blocks",),
    "zoo.adapters": ("ADAPTERS", "register_adapter"),
    "zoo.adapters.base": ("Adapter", "AdapterModule", "NotMergeableError", "StepContext", "WrappedLayer"),
    "zoo.api": ("adapters_of", "apply_adapter", "before_optimizer_step", "build_optimizer", "count_parameters",
                "extra_loss", "find_backbone", "list_adapters", "merge_adapters", "on_train_step", "param_groups",
                "prepare_adapters", "remove_adapters", "set_task", "unmerge_adapters"),
    "zoo.backbones": ("BACKBONES", "Backbone", "WeightsUnavailableError", "create_backbone", "list_backbones",
                      "register_backbone"),
    "zoo.checkpoint": ("AdapterMismatchError", "adapter_state_dict", "load_adapter", "read_adapter_config", "save_adapter"),
    "zoo.export": ("ExportError", "export_merged", "export_onnx", "export_peft", "load_peft"),
    "zoo.heads": ("CLASSIFIER_HEADS", "HEADS", "DenseRegressor", "ImageClassifier", "LayerNormLinearClassifier",
                  "MultiHeadClassifier", "build_classifier", "build_head_model", "register_head"),
    "zoo.hub": ("from_zoo",),
    "zoo.multi_adapter": ("MultiAdapter",),
    "zoo.registry": ("UnknownNameError",),
    "zoo.sites": ("SITE_KINDS", "Site", "SiteError", "find_sites"),
}
_WHERE = {name: mod for mod, names in _PUBLIC.items() for name in names}
_SUBMODULES = ("activation_checkpoint", "adapters", "api", "audio", "backbones", "checkpoint", "errnos", "export", "heads", "hub", "io", "reading",
               "multi_adapter", "predict", "registry", "sites", "zeroshot")
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    import importlib

    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"zoo.{name}")
    else:
        raise AttributeError(f"module 'zoo' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE) | set(_SUBMODULES))
