"""The ESC-50 recipes pinned to their reference scripts, value by value.

AST (``experiment=ast/esc50``): YuanGongND/ast ``egs/esc50/run_esc.sh`` (the hyperparameters), ``src/run.py``
(the loaders: validation batch = 2 × batch, no SpecAugment at evaluation) and ``src/traintest.py`` (line 53:
``torch.optim.Adam(trainables, args.lr, weight_decay=5e-7, betas=(0.95, 0.999))``; line 62:
``MultiStepLR(optimizer, list(range(args.lrscheduler_start, 1000, args.lrscheduler_step)),
gamma=args.lrscheduler_decay)``, stepped once per epoch, line 227).

PETL-AST (``experiment=petl_ast/esc50``): umbertocappellazzo/PETL_AST ``hparams/train.yaml``, ``main.py``
(lines 169–171: the fold table; 301–307: AdamW over ``model.parameters()``, betas (0.9, 0.98), eps 1e-6,
weight decay 0.1, CosineAnnealingLR over ``len(train_loader) * epochs`` steps; 344: the test evaluates
``model``, the last epoch's weights) and ``dataset/esc_50.py`` (SpecAugment F=24, T=80 on the HF feature
extractor's normalised output)."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import compose_config

TINY_AST = ["backbone.model=deit_tiny_distilled_patch16_224", "backbone.pretrained=false", "backbone.weights=null",
            "backbone.max_length=40", "++backbone.kwargs.embed_dim=64", "++backbone.kwargs.depth=2",
            "++backbone.kwargs.num_heads=2"]


def test_ast_esc50_recipe_is_run_esc_sh():
    c = compose_config(["experiment=ast/esc50"])
    # run_esc.sh line 17-21: model=ast, dataset=esc50, imagenetpretrain=True, audiosetpretrain=True, bal=none
    assert c.backbone.name == "ast" and c.task.dataset == "esc50"
    assert c.backbone.weights == "MIT/ast-finetuned-audioset-10-10-0.4593"  # AST's audioset_10_10_0.4593.pth on the Hub
    assert c.adapter.name == "full"  # traintest.py line 50: every parameter trains
    assert c.task.optimizer.lr == 1e-5  # line 24: lr=1e-5 when audiosetpretrain=True
    assert (c.data.freqm, c.data.timem) == (24, 96)  # lines 28-29
    assert c.data.mixup == 0.0  # line 30
    assert c.task.max_epochs == 25  # line 31
    assert (c.data.batch_size, c.data.eval_batch_size) == (48, 96)  # line 32; run.py: the val loader takes batch_size*2
    assert (c.backbone.fstride, c.backbone.tstride) == (10, 10)  # lines 33-34
    assert (c.data.mean, c.data.std) == (-6.6268077, 5.358466)  # lines 36-37
    assert c.backbone.max_length == 512 and c.backbone.num_mel_bins == 128  # line 38; run.py: num_mel_bins 128
    assert c.data.noise is False  # line 39
    assert c.task.label_smoothing == 0.0  # line 42: loss=CE (nn.CrossEntropyLoss(), no smoothing)
    assert c.task.scheduler.warmup_epochs == 0  # line 43: warmup=False
    assert c.task.scheduler.name == "multistep"  # lines 44-46: lrscheduler_start=5, step=1, decay=0.85
    assert (c.task.scheduler.start_epoch, c.task.scheduler.every, c.task.scheduler.gamma) == (5, 1, 0.85)
    # traintest.py line 53: Adam (L2 decay, not AdamW), weight_decay=5e-7, betas=(0.95, 0.999), over every trainable
    assert c.task.optimizer.name == "adam" and c.task.optimizer.weight_decay == 5e-7
    assert list(c.task.optimizer.betas) == [0.95, 0.999] and c.task.optimizer.eps == 1e-8 and c.task.optimizer.decay_1d
    assert c.data.specaug_after_norm is False  # dataloader.py: masks on the raw fbank, then (x - mean) / (2 std)
    assert c.backbone.pooling == "cls_dist"  # ast_models.py: (x[:, 0] + x[:, 1]) / 2
    # line 68: --data-val is the test fold; get_esc_result.py picks one epoch on the 5-fold average
    assert c.task.val_fold == "none" and c.task.selection == "last"
    # ast_models.py lines 73 / 132: mlp_head = Sequential(LayerNorm(768), Linear(768, label_dim)): the same head here,
    # so nothing departs from the paper any more
    assert c.task.head == "layernorm_linear" and c.task.get("differs_from_paper") is None
    from omegaconf import OmegaConf

    from tests.helpers import ROOT

    raw = OmegaConf.load(ROOT / "conf/experiment/ast/esc50.yaml")
    assert raw.hydra.sweeper.params["task.fold"] == "1,2,3,4,5"  # line 58: for fold in 1..5
    assert raw.hydra.callbacks.folds._target_ == "tasks.audio.FoldSummary"


def test_ast_esc50_optimiser_and_learning_rate_per_epoch_are_traintest_py():
    from tasks.runner import build_task

    task = build_task(compose_config(["experiment=ast/esc50", *TINY_AST]))
    conf = task.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]
    assert type(opt) is torch.optim.Adam  # coupled L2 decay, as torch.optim.Adam(weight_decay=5e-7)
    assert all(g["weight_decay"] == 5e-7 and g["betas"] == (0.95, 0.999) for g in opt.param_groups)
    n_trainable = sum(p.numel() for p in task.parameters() if p.requires_grad)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == n_trainable
    # the model is AST's: mlp_head (LayerNorm eps 1e-5, then Linear) on (cls + dist) / 2, the head in the optimiser
    from zoo.heads import LayerNormLinearClassifier

    assert type(task.model) is LayerNormLinearClassifier and task.model.backbone.pooling == "cls_dist"
    assert task.model.head[0].eps == 1e-5 and task.model.head[1].out_features == 50
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in in_opt for p in task.model.head.parameters())
    assert sched["interval"] == "epoch"
    # AST: epoch n (1-based) trains at lr · 0.85^max(0, n − 5) (MultiStepLR milestones 5, 6, ..., stepped per epoch)
    want = [1e-5 * 0.85 ** max(0, n - 5) for n in range(1, 26)]
    got = []
    for _ in range(25):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sched["scheduler"].step()
    assert got == pytest.approx(want, rel=1e-12)


def test_petl_ast_esc50_recipe_is_main_py():
    c = compose_config(["experiment=petl_ast/esc50", "adapter=lora"])
    # hparams/train.yaml: max_len_AST_ESC 500, batch_size_ESC 32, epochs_ESC_AST 50, lr_LoRA 0.005, weight_decay 0.1
    assert c.backbone.max_length == 500 and c.data.batch_size == 32 and c.task.max_epochs == 50
    assert c.task.optimizer.lr == 5e-3 and c.task.optimizer.weight_decay == 0.1
    # main.py 301-304: AdamW(model.parameters(), lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1): biases decay too
    assert (c.task.optimizer.get("name") or "adamw") == "adamw"
    assert list(c.task.optimizer.betas) == [0.9, 0.98] and c.task.optimizer.eps == 1e-6 and c.task.optimizer.decay_1d
    # main.py 307: CosineAnnealingLR(optimizer, len(train_loader) * epochs), stepped per batch: no warm-up, to 0
    assert (c.task.scheduler.get("name") or "cosine") == "cosine"
    assert c.task.scheduler.warmup_epochs == 0 and c.task.scheduler.min_lr == 0.0
    assert c.task.scheduler.get("cosine_epochs") is None
    assert c.task.label_smoothing == 0.0  # main.py 306: nn.CrossEntropyLoss()
    # dataset/esc_50.py: freq_mask 24, time_mask 80, applied to the extractor's normalised features
    assert (c.data.freqm, c.data.timem) == (24, 80) and c.data.specaug_after_norm is True
    assert (c.data.mean, c.data.std) == (-4.2677393, 4.5689974) and c.data.mixup == 0.0 and c.data.noise is False
    assert c.backbone.weights == "MIT/ast-finetuned-audioset-10-10-0.4593"  # AutoFeatureExtractor / model_ckpt
    assert c.backbone.pooling == "mean"  # final_output: 'ALL', AST.py: hidden_states.mean(dim=1)
    assert c.task.head == "linear"  # AST.py / AST_adapters.py / AST_LoRA.py: classification_head = nn.Linear(hidden, C)
    # main.py 169-171: test fold k, validation fold k-1; 344: eval_one_epoch(model, ...) tests the last epoch
    assert c.task.val_fold == "previous" and c.task.selection == "last"
    lrs = {a: compose_config(["experiment=petl_ast/esc50", f"adapter={a}"]).task.optimizer.lr
           for a in ("adapter", "lora", "bitfit", "vpt", "prefix", "linear", "full")}
    # hparams/train.yaml: lr_adapter, lr_LoRA, lr_FitBit 0.005; lr_prompt 0.01; lr_linear 0.001; lr_fullFT 0.00005
    assert lrs == {"adapter": 5e-3, "lora": 5e-3, "bitfit": 5e-3, "vpt": 1e-2, "prefix": 1e-2, "linear": 1e-3, "full": 5e-5}


def test_decay_1d_puts_biases_and_norms_under_weight_decay():
    from tasks.runner import build_task

    for recipe, decays in (("experiment=petl_ast/esc50", True), ("experiment=tiny_audio", False)):
        task = build_task(compose_config([recipe, "adapter=full", *TINY_AST]))
        groups = task.param_groups(1e-3, 0.1)
        biases = {id(p) for n, p in task.named_parameters() if n.endswith(".bias")}
        decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
        assert biases and (biases <= decayed) == decays and (not biases & decayed) == (not decays), recipe


@pytest.mark.parametrize("after", [False, True])
def test_specaugment_masks_before_or_after_normalisation(after):
    from zoo.audio import FrontEnd, normalize

    mean, std = -4.2677393, 4.5689974
    fb = torch.randn(50, 16) * 3 - 5
    front = FrontEnd(50, mean, std, freqm=8, timem=20, specaug_after_norm=after)
    torch.manual_seed(0)
    out = front.finish(fb.clone(), train=True)
    clean = normalize(fb, mean, std)
    masked = out != clean
    assert masked.any()
    # AST masks the raw fbank (masked cells become 0 before normalising: −mean / 2std after); PETL-AST masks the
    # extractor's normalised output (masked cells are 0)
    fill = 0.0 if after else -mean / (2 * std)
    assert torch.allclose(out[masked], torch.full_like(out[masked], fill), atol=1e-6)


def test_unknown_optimizer_or_schedule_names_are_one_line():
    from hydra.errors import InstantiationException

    from tasks.runner import build_task

    with pytest.raises(InstantiationException, match=r"task.optimizer.name='sgd'; valid: adamw, adam"):
        build_task(compose_config(["experiment=ast/esc50", *TINY_AST, "task.optimizer.name=sgd"]))
    task = build_task(compose_config(["experiment=ast/esc50", *TINY_AST, "task.scheduler.name=step"]))
    with pytest.raises(ValueError, match=r"task.scheduler.name='step'; valid here: cosine, multistep"):
        task.configure_optimizers()


def test_an_unknown_task_head_names_the_valid_ones():
    from hydra.errors import InstantiationException

    from tasks.runner import build_task

    with pytest.raises(InstantiationException, match=r"task.head='mlp'; valid: linear, layernorm_linear"):
        build_task(compose_config(["experiment=ast/esc50", *TINY_AST, "task.head=mlp"]))


# what PETL-AST trains besides each method and its Linear head (zoo names: final_norm = HF layernorm, norm1 =
# layernorm_before, norm2 = layernorm_after): src/AST_adapters.py L292-307, AST_LoRA.py L138-143,
# AST_prompt_tuning.py L56-72 / L336-341, main.py L234-239 (linear); BitFit and full-FT nothing more
PETL_AST_TRAINS_ALSO = {("lora", None): ["final_norm"], ("vpt", None): ["final_norm"], ("prefix", None): ["final_norm"],
                        ("linear", None): ["final_norm"], ("adapter", "pfeiffer"): ["norm2", "final_norm"],
                        ("adapter", "houlsby"): ["norm1", "norm2", "final_norm"],
                        ("conformer", "pfeiffer"): ["norm2", "final_norm"],
                        ("conformer", "houlsby"): ["norm1", "norm2", "final_norm"],
                        ("full", None): None, ("bitfit", None): None, ("ssf", None): None}


@pytest.mark.parametrize("recipe", ["petl_ast/esc50", "petl_ast/speechcommands"])
def test_petl_ast_recipes_train_the_layernorms_petl_ast_trains(recipe):
    """PETL-AST's models freeze only AST's embeddings and encoder, so its final LayerNorm trains under every
    method (main.py's linear unfreezes it explicitly); its adapters also train the blocks' layernorm_after
    (Houlsby: layernorm_before too). The recipe sets the method's train_also to exactly that, and records no
    difference from the paper."""
    for (name, style), want in PETL_AST_TRAINS_ALSO.items():
        c = compose_config([f"experiment={recipe}", f"adapter={name}"] + ([f"adapter.style={style}"] if style else []))
        assert c.task.head == "linear"
        assert c.adapter.train_also == want, (name, style)
        # only the bottleneck adapter's init is recorded as departing (see PETL_AST_METHOD_SETTINGS below)
        assert bool(c.task.get("differs_from_paper")) == (name == "adapter"), name


def test_the_recipe_trains_exactly_those_norms():
    from tasks.runner import build_task

    for name, style, norms in (("lora", None, {"norm"}), ("linear", None, {"norm"}),
                               ("conformer", "pfeiffer", {"norm", "norm2"}), ("adapter", "houlsby", {"norm", "norm1", "norm2"})):
        task = build_task(compose_config(["experiment=petl_ast/esc50", f"adapter={name}", *TINY_AST]
                                         + ([f"adapter.style={style}"] if style else [])))
        bb = task.model.backbone
        assert all(p.requires_grad for p in bb.model.norm.parameters()), name  # PETL-AST's layernorm
        for kind in ("norm1", "norm2"):
            flags = {p.requires_grad for blk in bb.model.blocks for p in getattr(blk, kind).parameters()}
            assert flags == {kind in norms}, (name, kind)
        base = {n for n, p in bb.named_parameters() if p.requires_grad and not any(
            id(p) == id(q) for a in bb.adapters for q in a.adapter_parameters())}
        assert {n.split(".")[-2] for n in base} == norms, (name, sorted(base)[:4])  # and nothing else of AST
    task = build_task(compose_config(["experiment=petl_ast/esc50", "adapter=bitfit", *TINY_AST]))
    assert task.model.backbone.model.norm.bias.requires_grad  # BitFit: its bias trains, as in main.py's BitFit


# Each method's own settings in PETL-AST: main.py's argparse defaults (the same for every dataset; hparams/train.yaml
# holds no method setting), cited per value. Methods absent here (linear, full) have no setting of their own.
PETL_AST_METHOD_SETTINGS = {
    # main.py L55-60: --seq_or_par parallel, --reduction_rate_adapter 96, --adapter_type Pfeiffer, --apply_residual
    # False, --adapter_block conformer, --kernel_size 31; src/AST_adapters.py L67-74 (GELU, no LayerNorm, no dropout)
    "adapter": {"style": "pfeiffer", "placement": "parallel", "reduction_rate": 96, "act": "gelu", "layernorm": False,
                "dropout": 0.0, "scale": 1.0},
    # src/AST_adapters.py L93-119: Conformer_adapter(p_dropout=0.), its LayerNorm's output overwritten, no init call
    "conformer": {"style": "pfeiffer", "placement": "parallel", "reduction_rate": 96, "kernel_size": 31,
                  "dropout": 0.0, "layernorm": False, "zero_init": False},
    # main.py L78-79: --reduction_rate_lora 64, --alpha_lora 8; src/AST_LoRA.py L62-76: q and v, A zeros, B Kaiming
    "lora": {"reduction_rate": 64, "alpha": 8.0, "targets": ["q", "v"], "init": "mirrored", "dropout": 0.0,
             "scaling": "standard"},
    # main.py L87-91: --prompt_len_prompt 25, --is_deep_prompt True, --drop_prompt 0.; src/AST_prompt_tuning.py
    # L115-120: the prompts take the DIST token's place
    "vpt": {"num_tokens": 25, "mode": "deep", "dropout": 0.0, "replace_prefix": 1},
    # main.py L86: --prompt_len_pt 24, split into 12 key + 12 value tokens (src/AST_prompt_tuning.py L256-261)
    "prefix": {"num_tokens": 12},
    # main.py L241-246: the biases of nn.Linear and nn.LayerNorm modules only
    "bitfit": {"biases": "linear_norm"},
}


@pytest.mark.parametrize("recipe", ["petl_ast/esc50", "petl_ast/speechcommands"])
def test_petl_ast_recipes_pin_each_methods_own_settings(recipe):
    for name, want in PETL_AST_METHOD_SETTINGS.items():
        c = compose_config([f"experiment={recipe}", f"adapter={name}"])
        got = {k: (list(v) if k == "targets" else v) for k, v in c.adapter.items() if k in want}
        assert got == want, name
    # the command line still wins over the pinned value, and other recipes keep the zoo's defaults
    assert compose_config([f"experiment={recipe}", "adapter=lora", "adapter.reduction_rate=32"]).adapter.reduction_rate == 32
    assert compose_config(["experiment=tiny_audio", "adapter=lora"]).adapter.reduction_rate is None
    assert compose_config(["experiment=tiny_audio", "adapter=adapter"]).adapter.style == "houlsby"


WIDE_TINY_AST = [*TINY_AST, "++backbone.kwargs.embed_dim=192"]  # d = 192: b = round(192 / 96) = 2, r = round(192 / 64) = 3


def _adapter_params(task):
    return sum(p.numel() for a in task.model.backbone.adapters for p in a.adapter_parameters())


@pytest.mark.parametrize("name", ["adapter", "conformer"])
def test_petl_ast_adapters_have_petl_ast_parameter_count(name):
    """One Pfeiffer adapter per block (at the FFN), b = round(d / 96), parallel; counted by PETL-AST's modules:
    Bottleneck_adapter = Linear(d, b) + Linear(b, d) (src/AST_adapters.py L68-69); Conformer_adapter = Conv1d(d, 2b, 1)
    + depthwise Conv1d(b, b, 31, groups=b) + BatchNorm1d(b) + Conv1d(b, d, 1) (L98-116), less its LayerNorm (2d,
    L97), which PETL-AST counts but never applies (L130-131)."""
    from tasks.runner import build_task
    from zoo.adapters.adapter import ParallelAdapter

    task = build_task(compose_config(["experiment=petl_ast/esc50", f"adapter={name}", *WIDE_TINY_AST]))
    d, depth, b, k = 192, 2, 2, 31
    per = (d * b + b) + (b * d + d) if name == "adapter" else (d * 2 * b + 2 * b) + (b * k + b) + 2 * b + (b * d + d)
    assert _adapter_params(task) == depth * per
    mods = task.model.backbone.adapters[0].modules
    assert len(mods) == depth and all(isinstance(m, ParallelAdapter) for m in mods)  # Pfeiffer: the FFN only


def test_petl_ast_lora_prompts_and_prefixes_are_petl_ast_sized():
    from tasks.runner import build_task

    d, depth = 192, 2
    lora = build_task(compose_config(["experiment=petl_ast/esc50", "adapter=lora", *WIDE_TINY_AST]))
    w = lora.model.backbone.adapters[0].modules[0]
    assert (w.rank, w.scaling) == (3, 8 / 64)  # src/AST_LoRA.py L62, L66: round(d / RR), alpha / RR
    assert _adapter_params(lora) == depth * 2 * (d * 3 + 3 * d)  # q and v: down d x r, up r x d, no bias
    vpt = build_task(compose_config(["experiment=petl_ast/esc50", "adapter=vpt", *WIDE_TINY_AST]))
    assert _adapter_params(vpt) == depth * 25 * d  # prompt_embeddings + (layers - 1) deep prompts, 25 each
    prefix = build_task(compose_config(["experiment=petl_ast/esc50", "adapter=prefix", *WIDE_TINY_AST]))
    assert _adapter_params(prefix) == depth * 2 * 12 * d  # key_tokens and value_tokens, 24 / 2 each per layer


def test_petl_ast_bitfit_trains_the_linear_and_layernorm_biases_only():
    """main.py L243-246: every Linear / LayerNorm bias of AST; the patch embedding (a Conv2d) keeps its bias frozen,
    which the zoo's plain BitFit (every bias) would train."""
    from tasks.runner import build_task

    def trained(overrides):
        task = build_task(compose_config(["experiment=petl_ast/esc50", "adapter=bitfit", *TINY_AST, *overrides]))
        return {n for n, p in task.model.backbone.named_parameters() if p.requires_grad}, task.model.backbone

    names, bb = trained([])
    want = {f"model.{n}.bias" for n, m in bb.model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm)) and m.bias is not None}
    assert names == want and "model.patch_embed.proj.bias" not in names
    assert any(".attn.qkv.bias" in n for n in names) and "model.norm.bias" in names
    everything, _ = trained(["adapter.biases=all"])
    assert everything == want | {"model.patch_embed.proj.bias"}
    from hydra.errors import InstantiationException

    with pytest.raises((ValueError, InstantiationException), match=r"unknown bitfit biases 'conv'; valid: all, linear_norm"):
        trained(["adapter.biases=conv"])
