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

from zoo.activation_checkpoint import checkpoint_blocks  # noqa: E402
from zoo.adapters import ADAPTERS, register_adapter  # noqa: E402
from zoo.adapters.base import Adapter, AdapterModule, NotMergeableError, StepContext, WrappedLayer  # noqa: E402
from zoo.api import (  # noqa: E402
    adapters_of,
    apply_adapter,
    before_optimizer_step,
    build_optimizer,
    count_parameters,
    extra_loss,
    find_backbone,
    list_adapters,
    merge_adapters,
    on_train_step,
    param_groups,
    prepare_adapters,
    remove_adapters,
    set_task,
    unmerge_adapters,
)
from zoo.backbones import BACKBONES, Backbone, WeightsUnavailableError, create_backbone, list_backbones, register_backbone  # noqa: E402
from zoo.checkpoint import AdapterMismatchError, adapter_state_dict, load_adapter, read_adapter_config, save_adapter  # noqa: E402
from zoo.export import ExportError, export_merged, export_onnx, export_peft, load_peft  # noqa: E402
from zoo.heads import HEADS, DenseRegressor, ImageClassifier, MultiHeadClassifier, build_head_model, register_head  # noqa: E402
from zoo.hub import from_zoo  # noqa: E402
from zoo.multi_adapter import MultiAdapter  # noqa: E402
from zoo.registry import UnknownNameError  # noqa: E402
from zoo.sites import SITE_KINDS, Site, SiteError, find_sites  # noqa: E402
