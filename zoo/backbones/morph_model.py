"""MORPH's ``ViT3DRegression``, reimplemented in plain PyTorch.

Rautela et al., "MORPH: Shape-agnostic PDE Foundation Models" (arXiv 2509.21670, LANL;
reference code github.com/lanl/MORPH @ a16d5c4, ``src/utils/vit_conv_xatt_axialatt2.py``).

Input ``vol`` in UPTF-7 layout ``(B, t, F, C, D, H, W)`` (t context frames, F ≤ 3 fields,
C ≤ 3 components, spatial axes 1 or a multiple of 8). ``forward`` returns ``(enc, z, y)``:

1. **Component-wise convolution** (B·t·F folded into the batch, C zero-padded to 3):
   ``Conv3d(3→8, 1×1×1, no bias)`` then a channel-doubling stack of ``Conv3d(3×3×3) + LeakyReLU(0.2)``,
   each layer ``c → min(2c, conv_filter)`` until ``conv_filter`` (8 → 16 → 24 for 24), and one more
   ``Conv3d(3×3×3) + LeakyReLU(0.2)``.
2. **Patching**: patch 8 on every axis longer than 1 (1 on singleton axes), features flattened
   channel-major then (pd, ph, pw), zero-padded at the end to ``filters·8³`` and projected by one
   shared ``Linear(filters·8³ → dim)``.
3. **Field cross-attention**: one learnable query per (b, t, patch) attends over the F field
   tokens (torch-MHA semantics, ``heads_xa`` heads), fusing them into one token: ``enc (B, t, n, dim)``.
4. **Positional embedding** ``(1, max_ar, max_patches, dim)``: ``slin_tslice`` (first t time slices,
   linear interpolation along the flattened patch axis, ``align_corners=False``) or ``st_bilinear``
   (anti-aliased bilinear over (time, patch); MORPH-L).
5. **Encoder blocks** (pre-norm) ``x ← x + Axial(LN(x)); x ← x + MLP(LN(x))`` where, with u = LN(x)
   on the token grid (t, D', H', W'): ``u ← u + Attn_t(u)`` if t > 1, then
   ``Axial(u) = u + Attn_D(u) + Attn_H(u) + Attn_W(u)`` (the three from the same u). The block adds
   x again: MORPH's "double residual". On a singleton axis the attention returns V unchanged, so
   that branch is ``o(v(u))``, not skipped.
6. **Decoder**: ``LN → Linear(dim → 3·3·8³)``; the first ``F·C·patch_vol`` channels of the **last**
   time step are un-patchified into the next-frame prediction ``y (B, F, C, D, H, W)``.

Differences from the reference's module layout (the function is the same; the golden fixture test
checks ``enc``, ``z`` and ``y`` to 1e-5): each axial attention's q, k, v Linears are stored fused as
one ``qkv`` Linear (q, k, v row blocks, so the shared site vocabulary's ``q``/``k``/``v`` slices and
``qkv`` both exist); the MLP Linears are named ``fc1``/``fc2``; the field cross-attention uses
explicit ``q_proj``/``k_proj``/``v_proj``/``out_proj`` Linears instead of ``nn.MultiheadAttention``'s
packed ``in_proj_weight`` (a wrapper on a Linear is then actually called). :func:`from_reference`
and :func:`to_reference` map state dicts both ways.

Reading of the reference where its text is ambiguous (training-mode only, no effect in eval):
embedding dropout is applied to the interpolated table and again after the add; attention-probability
dropout uses ``dropout``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

PATCH = 8
MAX_FIELDS = 3
MAX_COMPONENTS = 3
CONV_HIDDEN = 8  # ConvOperator's input projection width (a default argument in the reference)
AXES = ("t", "d", "h", "w")


@dataclass(frozen=True)
class MorphConfig:
    conv_filter: int = 8
    dim: int = 256
    heads: int = 4
    depth: int = 4
    mlp_dim: int = 1024
    heads_xa: int = 32
    max_ar: int = 1
    max_patches: int = 4096
    dropout: float = 0.1
    emb_dropout: float = 0.1
    pos_encoding: str = "slin_tslice"  # | st_bilinear

    @property
    def max_features(self) -> int:
        return self.conv_filter * PATCH ** 3

    def as_dict(self) -> dict:
        return asdict(self)


# [conv_filters, dim, heads, depth, mlp_dim]: MORPH_MODELS in the reference's config/argument_parser.py
SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "Ti": (8, 256, 4, 4, 1024),
    "S": (8, 512, 8, 4, 2048),
    "M": (8, 768, 12, 8, 3072),
    "Lt": (8, 1024, 16, 8, 3072),
    "L": (8, 1024, 16, 16, 4096),
    "XL": (64, 1536, 24, 16, 8192),
}


def config_for(size: str, **overrides) -> MorphConfig:
    """The size's config; ``max_ar`` defaults to 16 for L (its released checkpoint), else 1, and the
    positional encoding to ``st_bilinear`` for L with max_ar > 1 (as the reference's pretraining)."""
    if size not in SIZES:
        raise ValueError(f"unknown MORPH size {size!r}; valid sizes: {', '.join(SIZES)}")
    f, d, h, depth, mlp = SIZES[size]
    cfg = MorphConfig(conv_filter=f, dim=d, heads=h, depth=depth, mlp_dim=mlp, max_ar=16 if size == "L" else 1)
    over = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(over) - set(MorphConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown MORPH option(s) {sorted(unknown)}; valid: {', '.join(MorphConfig.__dataclass_fields__)}")
    cfg = replace(cfg, **over)
    if "pos_encoding" not in over:
        cfg = replace(cfg, pos_encoding="st_bilinear" if size == "L" and cfg.max_ar > 1 else "slin_tslice")
    if cfg.pos_encoding not in ("slin_tslice", "st_bilinear"):
        raise ValueError(f"pos_encoding={cfg.pos_encoding!r}; valid: slin_tslice, st_bilinear")
    if cfg.dim % cfg.heads or cfg.dim % cfg.heads_xa:
        raise ValueError(f"dim={cfg.dim} must be divisible by heads={cfg.heads} and heads_xa={cfg.heads_xa}")
    return cfg


# ---------------------------------------------------------------------------------------- embedding
class ConvOperator(nn.Module):
    """Component-wise convolution: C (padded to 3) → ``conv_filter`` channels, weights shared over fields."""

    def __init__(self, conv_filter: int):
        super().__init__()
        self.input_proj = nn.Conv3d(MAX_COMPONENTS, CONV_HIDDEN, 1, bias=False)
        layers: list[nn.Module] = []
        c = CONV_HIDDEN
        while c < conv_filter:  # channel doubling capped at conv_filter (none for the released filters=8)
            nxt = min(2 * c, conv_filter)  # the reference's min(prev * 2, conv_filter): 8 -> 16 -> 24 for 24
            layers += [nn.Conv3d(c, nxt, 3, padding=1, bias=False), nn.LeakyReLU(0.2)]
            c = nxt
        layers += [nn.Conv3d(c, conv_filter, 3, padding=1, bias=False), nn.LeakyReLU(0.2)]
        self.conv_stack = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, D, H, W)
        if x.shape[1] < MAX_COMPONENTS:
            x = F.pad(x, (0, 0, 0, 0, 0, 0, 0, MAX_COMPONENTS - x.shape[1]))
        return self.conv_stack(self.input_proj(x))


class FieldCrossAttention(nn.Module):
    """One learnable query attends over the F field tokens of each patch (torch-MHA semantics,
    explicit projections): ``out_proj(softmax(q_h k_h^T/√d_h) v_h)`` per head."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Parameter(torch.zeros(1, 1, dim))
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        nn.init.normal_(self.q, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, F, dim) -> (N, dim)
        n, f, d = x.shape
        h = self.heads
        q = self.q_proj(self.q).reshape(1, h, 1, d // h).expand(n, h, 1, d // h)
        k = self.k_proj(x).reshape(n, f, h, d // h).transpose(1, 2)
        v = self.v_proj(x).reshape(n, f, h, d // h).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v)  # (n, h, 1, d_h)
        return self.out_proj(o.reshape(n, d))


class PatchEmbedding(nn.Module):
    """``HybridPatchEmbedding3D``: conv → patchify → zero-pad features → project → fuse fields."""

    def __init__(self, cfg: MorphConfig):
        super().__init__()
        self.max_features = cfg.max_features
        self.conv_features = ConvOperator(cfg.conv_filter)
        self.projection = nn.Linear(cfg.max_features, cfg.dim)
        self.field_attn = FieldCrossAttention(cfg.dim, cfg.heads_xa)

    def forward(self, vol: torch.Tensor) -> torch.Tensor:
        b, t, f, c, d, h, w = vol.shape
        pd, ph, pw = patch_sizes((d, h, w))
        x = self.conv_features(vol.reshape(b * t * f, c, d, h, w))
        cf = x.shape[1]
        # (N, C', nD·pD, nH·pH, nW·pW) -> (N, n, C'·pD·pH·pW): patches row-major, features channel-major
        x = x.reshape(b, t, f, cf, d // pd, pd, h // ph, ph, w // pw, pw)
        x = x.permute(0, 1, 4, 6, 8, 2, 3, 5, 7, 9)  # (b, t, nD, nH, nW, F, C', pD, pH, pW)
        n = (d // pd) * (h // ph) * (w // pw)
        x = x.reshape(b * t * n, f, cf * pd * ph * pw)
        x = F.pad(x, (0, self.max_features - x.shape[-1]))
        x = self.field_attn(self.projection(x))
        return x.reshape(b, t, n, -1)


def patch_sizes(spatial: tuple[int, int, int]) -> tuple[int, int, int]:
    """8 on every axis longer than 1, 1 on singleton axes; other lengths are an error."""
    bad = [(name, s) for name, s in zip("DHW", spatial) if s != 1 and s % PATCH]
    if bad:
        raise ValueError(
            f"MORPH needs every spatial axis to be 1 or a multiple of {PATCH}; got "
            + ", ".join(f"{n}={s}" for n, s in bad)
            + " (pad or crop the data, e.g. tasks.data.pde.pad_to_multiple)"
        )
    return tuple(1 if s == 1 else PATCH for s in spatial)  # type: ignore[return-value]


class PositionalEncoding(nn.Module):
    """Learned ``(1, max_ar, max_patches, dim)`` table resampled to ``(t, n)``."""

    def __init__(self, cfg: MorphConfig):
        super().__init__()
        self.mode = cfg.pos_encoding
        self.pos_embedding = nn.Parameter(torch.zeros(1, cfg.max_ar, cfg.max_patches, cfg.dim))
        nn.init.normal_(self.pos_embedding, std=0.02)
        self.dropout = nn.Dropout(cfg.emb_dropout)

    def forward(self, t: int, n: int) -> torch.Tensor:
        table = self.pos_embedding
        max_ar = table.shape[1]
        if self.mode == "slin_tslice":
            if t > max_ar:  # the reference silently mis-reshapes here
                raise ValueError(f"{t} context frames but this MORPH was built with max_ar={max_ar}")
            pe = table[0, :t].transpose(1, 2)  # (t, dim, P)
            pe = F.interpolate(pe, size=n, mode="linear", align_corners=False)
            pe = pe.transpose(1, 2).unsqueeze(0)  # (1, t, n, dim)
        else:
            pe = table.permute(0, 3, 1, 2)  # (1, dim, max_ar, P)
            pe = F.interpolate(pe, size=(t, n), mode="bilinear", align_corners=False, antialias=True)
            pe = pe.permute(0, 2, 3, 1)
        return self.dropout(pe)


# ---------------------------------------------------------------------------------------- encoder
class AxisAttention(nn.Module):
    """Multi-head self-attention along one axis of the token grid (fused ``qkv``, output ``o``).

    A length-1 axis returns V unchanged (the reference's SDPA), so the branch is ``o(v(u))``.
    """

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.p = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, L, dim)
        n, length, d = x.shape
        h = self.heads
        qkv = self.qkv(x).reshape(n, length, 3, h, d // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if length == 1:
            o = v
        else:
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0)
        return self.o(o.transpose(1, 2).reshape(n, length, d))


def along(x: torch.Tensor, axis: int, fn) -> torch.Tensor:
    """Apply ``fn`` (a sequence op on (N, L, dim)) along grid axis ``axis`` of ``x`` (B, t, D, H, W, dim)."""
    moved = x.movedim(axis, -2)
    shape = moved.shape
    out = fn(moved.reshape(-1, shape[-2], shape[-1]))
    return out.reshape(shape).movedim(-2, axis)


class AxialAttention(nn.Module):
    """``AxialAttention3DSpaceTime``: time attention (t > 1) then D, H, W attention from the same u;
    returns ``u + A_D(u) + A_H(u) + A_W(u)``."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.attn_t = AxisAttention(dim, heads, dropout)
        self.attn_d = AxisAttention(dim, heads, dropout)
        self.attn_h = AxisAttention(dim, heads, dropout)
        self.attn_w = AxisAttention(dim, heads, dropout)
        self.grid: tuple[int, int, int] | None = None  # (D', H', W'), set by the model per forward

    def forward(self, u: torch.Tensor) -> torch.Tensor:  # (B, t, n, dim)
        b, t, n, d = u.shape
        nd, nh, nw = self.grid
        g = u.reshape(b, t, nd, nh, nw, d)
        if t > 1:
            g = g + along(g, 1, self.attn_t)
        out = g + along(g, 2, self.attn_d) + along(g, 3, self.attn_h) + along(g, 4, self.attn_w)
        return out.reshape(b, t, n, d)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class EncoderBlock(nn.Module):
    def __init__(self, cfg: MorphConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.axial_attn = AxialAttention(cfg.dim, cfg.heads, cfg.dropout)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.mlp = Mlp(cfg.dim, cfg.mlp_dim, cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.axial_attn(self.norm1(x))  # the attention output already holds norm1(x)
        return x + self.mlp(self.norm2(x))


class Decoder(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.linear = nn.Linear(dim, MAX_FIELDS * MAX_COMPONENTS * PATCH ** 3)

    def forward(self, z_last: torch.Tensor, f: int, c: int, spatial: tuple[int, int, int]) -> torch.Tensor:
        b, n, _ = z_last.shape
        d, h, w = spatial
        pd, ph, pw = patch_sizes(spatial)
        y = self.linear(self.norm(z_last))[..., : f * c * pd * ph * pw]
        y = y.reshape(b, d // pd, h // ph, w // pw, f, c, pd, ph, pw)
        y = y.permute(0, 4, 5, 1, 6, 2, 7, 3, 8)  # (b, F, C, nD, pD, nH, pH, nW, pW)
        return y.reshape(b, f, c, d, h, w)


class ViT3DRegression(nn.Module):
    """MORPH: ``forward(vol) -> (enc, z, y)``; see the module docstring."""

    def __init__(self, cfg: MorphConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = PatchEmbedding(cfg)
        self.pos_encoding = PositionalEncoding(cfg)
        self.emb_dropout = nn.Dropout(cfg.emb_dropout)
        self.transformer_blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.depth))
        self.decoder = Decoder(cfg.dim)

    @staticmethod
    def check_input(vol: torch.Tensor, max_ar: int | None = None) -> None:
        if vol.ndim != 7:
            raise ValueError(f"MORPH takes UPTF-7 input (B, t, F, C, D, H, W); got a {vol.ndim}-D tensor {tuple(vol.shape)}")
        _, t, f, c = vol.shape[:4]
        if not 1 <= f <= MAX_FIELDS or not 1 <= c <= MAX_COMPONENTS:
            raise ValueError(f"MORPH takes 1..{MAX_FIELDS} fields and 1..{MAX_COMPONENTS} components; got F={f}, C={c}")
        patch_sizes(tuple(vol.shape[4:]))

    def grid(self, vol: torch.Tensor) -> tuple[int, int, int]:
        d, h, w = vol.shape[4:]
        pd, ph, pw = patch_sizes((d, h, w))
        return d // pd, h // ph, w // pw

    def encode(self, vol: torch.Tensor) -> torch.Tensor:
        self.check_input(vol)
        return self.patch_embedding(vol)

    def transform(self, enc: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        _, t, n, _ = enc.shape
        x = self.emb_dropout(enc + self.pos_encoding(t, n))
        self.current_grid = (t, *grid)  # read by grid-aware adapters (f_adapter)
        for blk in self.transformer_blocks:
            _set_grid(blk, grid)
            x = blk(x)
        return x

    def decode(self, z: torch.Tensor, f: int, c: int, spatial) -> torch.Tensor:
        return self.decoder(z[:, -1], f, c, tuple(spatial))

    def forward(self, vol: torch.Tensor):
        enc = self.encode(vol)
        z = self.transform(enc, self.grid(vol))
        return enc, z, self.decode(z, vol.shape[2], vol.shape[3], vol.shape[4:])


def _unwrapped(m: nn.Module) -> nn.Module:
    while hasattr(m, "base") and isinstance(m.base, nn.Module):
        m = m.base
    return m


def _set_grid(block: nn.Module, grid: tuple[int, int, int]) -> None:
    """Tell the block's axial attention (under any adapter wrappers) the current token grid."""
    attn = _unwrapped(_unwrapped(block).axial_attn)
    attn.grid = tuple(grid)


# ---------------------------------------------------------------------------------------- state dicts
def from_reference(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A reference (lanl/MORPH) state dict -> this module's names.

    Strips a DataParallel ``module.`` prefix and the ``LoRALinear`` ``.base.`` wrapping, renames
    ``mlp.0/mlp.3`` to ``mlp.fc1/mlp.fc2``, fuses each axial attention's q, k, v into ``qkv`` and
    splits the field attention's packed ``in_proj`` into q/k/v projections.
    """
    lora = [k for k in sd if k.endswith((".A", ".B"))]
    if lora:
        raise ValueError(f"the checkpoint holds MORPH LoRA factors ({lora[0]}, ...); merge them into the base "
                         "weights first, or load a pretrained (foundation-model) checkpoint")
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        k = k[len("module."):] if k.startswith("module.") else k
        k = k.replace(".base.", ".").replace(".mlp.0.", ".mlp.fc1.").replace(".mlp.3.", ".mlp.fc2.")
        out[k] = v
    for k in [k for k in out if ".axial_attn.attn_" in k and k.rsplit(".", 2)[-2] == "q"]:
        prefix, kind = k.rsplit(".", 2)[0], k.rsplit(".", 1)[1]  # ...attn_d, weight|bias
        out[f"{prefix}.qkv.{kind}"] = torch.cat([out.pop(f"{prefix}.{p}.{kind}") for p in "qkv"], 0)
    fa = "patch_embedding.field_attn."
    for kind in ("weight", "bias"):
        key = f"{fa}attn.in_proj_{kind}"
        if key in out:
            for name, part in zip(("q_proj", "k_proj", "v_proj"), out.pop(key).chunk(3, 0)):
                out[f"{fa}{name}.{kind}"] = part
        if f"{fa}attn.out_proj.{kind}" in out:
            out[f"{fa}out_proj.{kind}"] = out.pop(f"{fa}attn.out_proj.{kind}")
    return out


def to_reference(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`from_reference` (names as ``ViT3DRegression`` with LoRA rank 0)."""
    out: dict[str, torch.Tensor] = {}
    fa = "patch_embedding.field_attn."
    packed: dict[str, list] = {"weight": [None] * 3, "bias": [None] * 3}
    for k, v in sd.items():
        if k.startswith(fa) and k[len(fa):].split(".")[0] in ("q_proj", "k_proj", "v_proj"):
            name, kind = k[len(fa):].split(".")
            packed[kind][("q_proj", "k_proj", "v_proj").index(name)] = v
            continue
        if k.startswith(f"{fa}out_proj."):
            out[k.replace(fa, f"{fa}attn.")] = v
            continue
        if ".axial_attn.attn_" in k and ".qkv." in k:
            prefix, kind = k.split(".qkv.")
            for name, part in zip("qkv", v.chunk(3, 0)):
                out[f"{prefix}.{name}.base.{kind}"] = part
            continue
        if ".axial_attn.attn_" in k and ".o." in k:
            out[k.replace(".o.", ".o.base.")] = v
            continue
        if ".mlp.fc1." in k or ".mlp.fc2." in k:
            out[k.replace(".mlp.fc1.", ".mlp.0.base.").replace(".mlp.fc2.", ".mlp.3.base.")] = v
            continue
        out[k] = v
    for kind, parts in packed.items():
        if all(p is not None for p in parts):
            out[f"{fa}attn.in_proj_{kind}"] = torch.cat(parts, 0)
    return out


def count_parameters(cfg: MorphConfig) -> int:
    """Analytic parameter count (no LoRA), e.g. 9,864,408 for Ti at max_ar=1."""
    d, m, f = cfg.dim, cfg.mlp_dim, cfg.conv_filter
    conv = MAX_COMPONENTS * CONV_HIDDEN
    c = CONV_HIDDEN
    while c < f:
        nxt = min(2 * c, f)
        conv += c * nxt * 27
        c = nxt
    conv += c * f * 27
    embed = conv + cfg.max_features * d + d + d + 4 * (d * d + d)
    pe = cfg.max_ar * cfg.max_patches * d
    block = 4 * d + 4 * 4 * (d * d + d) + (d * m + m) + (m * d + d)
    dec = 2 * d + d * 4608 + 4608
    return embed + pe + cfg.depth * block + dec


__all__ = ["MorphConfig", "SIZES", "config_for", "ViT3DRegression", "from_reference", "to_reference",
           "patch_sizes", "count_parameters", "AXES"]
