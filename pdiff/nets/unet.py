"""A DDPM-style U-Net for image denoisers: net(x_t, t, y=None) -> prediction (torch only).

The architecture of Ho et al. (2020, appendix B) as laid out in improved-diffusion's
``UNetModel``: residual blocks conditioned on an embedding of t (and optionally of a class
label), self-attention at chosen resolutions, every output of the way down kept and concatenated
on the way up, and a zero-initialised output layer so an eps network starts at eps = 0.
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from .embeddings import SinusoidalEmbedding


def zero_(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero (the residual branch then starts as identity)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv; add a per-channel projection of the embedding; GroupNorm, SiLU,
    dropout, zero-initialised conv; plus the input (through a 1x1 conv when channels change)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, *, dropout: float, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, in_ch), nn.SiLU(),
                                       nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_ch))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, out_ch), nn.SiLU(), nn.Dropout(dropout),
                                        zero_(nn.Conv2d(out_ch, out_ch, 3, padding=1)))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)  # (B, out_ch, H, W)
        h = h + self.emb_layers(emb)[:, :, None, None]
        return self.skip(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, GroupNorm first, residual, with a
    zero-initialised output projection."""

    def __init__(self, ch: int, *, num_heads: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj = zero_(nn.Conv1d(ch, ch, 1))
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x).reshape(B, C, H * W))  # (B, 3C, HW)
        qkv = qkv.reshape(B, 3, self.num_heads, C // self.num_heads, H * W).transpose(-1, -2)
        q, k, v = qkv.unbind(1)  # each (B, heads, HW, C / heads)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C / heads)
        h = h.transpose(-1, -2).reshape(B, C, H * W)
        return x + self.proj(h).reshape(B, C, H, W)


class Downsample(nn.Module):
    """A strided 3x3 convolution: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 convolution: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Stage(nn.Sequential):
    """Blocks applied in turn; the ResBlocks are also given the embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for block in self:
            x = block(x, emb) if isinstance(block, ResBlock) else block(x)
        return x


class UNet(nn.Module):
    """The DDPM U-Net on images ``xt`` (B, C, H, W) with H = W = ``image_size``.

    Level l (l = 0 .. len(channel_mults) - 1) works at resolution image_size / 2^l with
    ``base_channels * channel_mults[l]`` channels and ``num_res_blocks`` ResBlocks on the way down
    (``num_res_blocks + 1`` on the way up, one per stored skip), followed by self-attention when
    its resolution is in ``attention_resolutions``. The output has ``in_channels * out_multiplier``
    channels: with ``out_multiplier=2`` (learned variance) the mean channels come first.

    With ``num_classes`` the net is class-conditional: a label embedding over 0..num_classes is
    added to the time embedding, label ``num_classes`` (:attr:`null_label`) meaning "no label"
    for classifier-free guidance; ``y=None`` uses it for the whole batch.
    """

    def __init__(self, in_channels: int, image_size: int, *, base_channels: int = 32,
                 channel_mults: tuple[int, ...] = (1, 2), num_res_blocks: int = 1,
                 attention_resolutions: tuple[int, ...] = (4,), dropout: float = 0.0,
                 num_heads: int = 1, groups: int = 8, out_multiplier: int = 1,
                 num_classes: int | None = None):
        super().__init__()
        self.in_channels, self.image_size = in_channels, image_size
        self.out_multiplier, self.num_classes = out_multiplier, num_classes
        self._check(image_size, base_channels, channel_mults, attention_resolutions, num_heads, groups)
        self.factor = 2 ** (len(channel_mults) - 1)
        emb_dim = 4 * base_channels
        self.sinusoidal = SinusoidalEmbedding(base_channels)
        self.time_embed = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(),
                                        nn.Linear(emb_dim, emb_dim))
        self.label_embed = None if num_classes is None else nn.Embedding(num_classes + 1, emb_dim)
        res_block = lambda i, o: ResBlock(i, o, emb_dim, dropout=dropout, groups=groups)  # noqa: E731
        attention = lambda c: AttentionBlock(c, num_heads=num_heads, groups=groups)  # noqa: E731

        ch, res = base_channels, image_size
        self.down = nn.ModuleList([Stage(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skips = [ch]
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                blocks = [res_block(ch, base_channels * mult)]
                ch = base_channels * mult
                if res in attention_resolutions:
                    blocks.append(attention(ch))
                self.down.append(Stage(*blocks))
                skips.append(ch)
            if level < len(channel_mults) - 1:
                self.down.append(Stage(Downsample(ch)))
                skips.append(ch)
                res //= 2
        self.middle = Stage(res_block(ch, ch), attention(ch), res_block(ch, ch))
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            for i in range(num_res_blocks + 1):
                blocks = [res_block(ch + skips.pop(), base_channels * mult)]
                ch = base_channels * mult
                if res in attention_resolutions:
                    blocks.append(attention(ch))
                if level and i == num_res_blocks:
                    blocks.append(Upsample(ch))
                    res *= 2
                self.up.append(Stage(*blocks))
        self.out = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(),
                                 zero_(nn.Conv2d(ch, in_channels * out_multiplier, 3, padding=1)))

    @staticmethod
    def _check(image_size, base_channels, channel_mults, attention_resolutions, num_heads, groups):
        factor = 2 ** (len(channel_mults) - 1)
        if image_size % factor:
            raise ValueError(f"image_size {image_size} must be divisible by "
                             f"2**(len(channel_mults) - 1) = {factor} for {len(channel_mults)} levels")
        widths = sorted({base_channels * m for m in channel_mults})
        if any(w % groups for w in widths):
            g = math.gcd(*widths)
            valid = [d for d in range(1, g + 1) if g % d == 0]
            raise ValueError(f"GroupNorm needs channels divisible by groups: widths {widths} with "
                             f"groups={groups}; valid groups: {valid}")
        if any(w % num_heads for w in widths):
            raise ValueError(f"num_heads={num_heads} must divide every width {widths}")
        resolutions = [image_size // 2 ** level for level in range(len(channel_mults))]
        missing = sorted(set(attention_resolutions) - set(resolutions))
        if missing:
            raise ValueError(f"attention_resolutions {missing} never occur; the resolutions are "
                             f"{resolutions}")

    @property
    def null_label(self) -> int:
        """The label index meaning "no label" (classifier-free guidance)."""
        if self.num_classes is None:
            raise ValueError("the net is unconditional (num_classes=None): it has no null label")
        return self.num_classes

    def embed(self, t: torch.Tensor, y: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """The embedding of (t, y) in ``like``'s dtype: (B, 4 * base_channels)."""
        B = like.shape[0]
        t = torch.as_tensor(t, device=like.device).expand(B)
        emb = self.time_embed(self.sinusoidal(t).to(like.dtype))
        if self.label_embed is None:
            if y is not None:
                raise ValueError("labels y were given to an unconditional net (num_classes=None)")
            return emb
        if y is None:
            y = torch.full((B,), self.num_classes, dtype=torch.long, device=like.device)
        y = torch.as_tensor(y, device=like.device).long().expand(B)
        if ((y < 0) | (y > self.num_classes)).any():
            raise ValueError(f"labels must lie in 0..{self.num_classes - 1}, or be the null label "
                             f"{self.num_classes}; got values in {y.min().item()}..{y.max().item()}")
        return emb + self.label_embed(y)

    def forward(self, xt: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None):
        """The prediction at (x_t, t[, y]): xt (B, C, H, W) of any float dtype, t long (B,) or a
        scalar, y long (B,) or None; returns (B, C * out_multiplier, H, W) in xt's dtype.

        Several batch dimensions (B1, ..., Bk, C, H, W), as the trajectory objective's (N, T)
        steps, are flattened into one: t broadcasts to (B1, ..., Bk), y (one label per example,
        shape (B1,)) to it from the left."""
        if xt.dim() < 4 or xt.shape[-3] != self.in_channels:
            raise ValueError(f"xt must have shape (B, {self.in_channels}, H, W), "
                             f"got {tuple(xt.shape)}")
        if xt.dim() > 4:
            batch = xt.shape[:-3]
            n = batch.numel()
            t = torch.as_tensor(t, device=xt.device).expand(batch).reshape(n)
            if y is not None:
                y = torch.as_tensor(y, device=xt.device)
                y = y.reshape(y.shape + (1,) * (len(batch) - y.dim())).expand(batch).reshape(n)
            out = self.forward(xt.reshape((n,) + xt.shape[-3:]), t, y)
            return out.reshape(batch + out.shape[1:])
        if xt.shape[-1] % self.factor or xt.shape[-2] % self.factor:
            raise ValueError(f"H and W must be divisible by {self.factor}, "
                             f"got {tuple(xt.shape[-2:])}")
        emb = self.embed(t, y, xt)
        h, skips = xt, []
        for stage in self.down:
            h = stage(h, emb)
            skips.append(h)
        h = self.middle(h, emb)
        for stage in self.up:
            h = stage(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)  # (B, C * out_multiplier, H, W)


def unet_for(image_size: int, channels: int, **overrides) -> dict:
    """Keyword arguments for a CPU-sized :class:`UNet` on ``channels`` x ``image_size`` images:
    ``UNet(**unet_for(28, 1))``.

    The resolution halves while it stays even and at least 4, over at most 3 levels up to 32x32
    and 4 above (8 -> 8, 4; 28 -> 28, 14, 7; 32 -> 32, 16, 8; 64 -> 64, 32, 16, 8), with
    channel_mults (1, 2, 2, ...),
    self-attention at the lowest resolution and one ResBlock per level. base_channels is 32 up
    to 32x32 and 64 above: at 28x28 width 32 trains about 3 times as fast as 64 on a CPU
    (docs/benchmarks.md), which decides what a CPU can train in an hour. ``overrides`` replace
    any of these (names as in ``UNet``).
    """
    levels, res, max_levels = 1, image_size, 3 if image_size <= 32 else 4
    while levels < max_levels and res % 2 == 0 and res // 2 >= 4:
        levels, res = levels + 1, res // 2
    kwargs = dict(in_channels=channels, image_size=image_size,
                  base_channels=32 if image_size <= 32 else 64,
                  channel_mults=(1,) + (2,) * (levels - 1), num_res_blocks=1,
                  attention_resolutions=(res,))
    valid = set(inspect.signature(UNet).parameters)
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"unknown UNet arguments {unknown}; valid: {', '.join(sorted(valid))}")
    return {**kwargs, **overrides}
