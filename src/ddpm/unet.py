"""The eps-network: the DDPM UNet of Ho et al. 2020, appendix B, in pure PyTorch.

A PixelCNN++-style backbone of Wide-ResNet blocks with GroupNorm, a sinusoidal time embedding added
inside every residual block, self-attention at chosen resolutions and one in the middle, stride-2
downsampling, nearest-neighbour upsampling and concatenated skip connections. The block layout and
the parameter count follow the paper's TensorFlow code and improved-diffusion's `UNetModel`
(Nichol & Dhariwal 2021); the default configuration is the paper's CIFAR-10 model (35.7M parameters).

    net = UNet()              # Ho et al. 2020, CIFAR-10
    eps = net(x_t, t)         # (B, 3, 32, 32), (B,) -> (B, 3, 32, 32)
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def timestep_embedding(
    t: torch.Tensor, dim: int, max_period: float = 10000.0, cos_first: bool = True, freq_shift: int = 0
) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in Vaswani et al. 2017 / Ho et al. 2020.

    Frequencies exp(-ln(max_period) i / (half - freq_shift)), i = 0 .. half - 1; the result is [cos, sin]
    (improved-diffusion's ordering; cos_first=False gives [sin, cos]), zero-padded to `dim` when `dim` is odd.
    freq_shift = 1 with [sin, cos] is the paper's TensorFlow code (and diffusers' ddpm-cifar10-32). Computed in
    float32 whatever the autocast state.

    t: (B,) int or float timesteps. Returns (B, dim) float32.
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    freqs = torch.exp(-math.log(max_period) * exponent)  # (half,)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    parts = [torch.cos(args), torch.sin(args)]
    emb = torch.cat(parts if cos_first else parts[::-1], dim=1)  # (B, 2*half)
    return F.pad(emb, (0, dim % 2))  # (B, dim)


class _GroupNormChannelsLastCPU(torch.autograd.Function):
    """group_norm of a channels_last bf16/fp16 tensor on CPU: ATen's forward, a faster backward.

    ATen's CPU backward for channels_last low-precision inputs is much slower than for NCHW (docs/benchmarks.md),
    and converting layouts costs about as much as it saves; this backward is the same closed form
    (d x = rstd w dy + c2 x + c3 per group) as a few vectorised fp32 passes over the (N, HW, C) view.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float):
        N, C, H, W = x.shape
        y, mean, rstd = torch.native_group_norm(x, weight, bias, N, C, H * W, groups, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.groups = groups
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, weight, mean, rstd = ctx.saved_tensors
        N, C, H, W = x.shape
        G = ctx.groups
        D, M = C // G, H * W * (C // G)  # channels per group, elements per group
        xv = x.permute(0, 2, 3, 1).reshape(N, H * W, C).float()  # (N, HW, C), a view before .float()
        gv = grad_y.permute(0, 2, 3, 1).reshape(N, H * W, C).float()  # (N, HW, C)
        sum_gx = (gv * xv).sum(1).view(N, G, D)  # sum over HW of dy * x
        sum_g = gv.sum(1).view(N, G, D)  # sum over HW of dy
        mean, rstd = mean.float().view(N, G, 1), rstd.float().view(N, G, 1)
        w = weight.float().view(1, G, D)
        grad_w = (rstd * (sum_gx - mean * sum_g)).sum(0).reshape(C)
        grad_b = sum_g.sum(0).reshape(C)
        s1 = (sum_gx * w).sum(2, keepdim=True)  # (N, G, 1): sum over the group of w dy x
        s2 = (sum_g * w).sum(2, keepdim=True)  # (N, G, 1): sum over the group of w dy
        c2 = -(rstd**3) * (s1 - mean * s2) / M
        c3 = -rstd * s2 / M - c2 * mean
        a = (rstd * w).reshape(N, 1, C)
        c2, c3 = c2.expand(N, G, D).reshape(N, 1, C), c3.expand(N, G, D).reshape(N, 1, C)
        grad_x = torch.addcmul(c3, gv, a).addcmul_(xv, c2)  # (N, HW, C)
        grad_x = grad_x.to(x.dtype).view(N, H, W, C).permute(0, 3, 1, 2)  # (N, C, H, W), channels_last
        return grad_x, grad_w.to(weight.dtype), grad_b.to(weight.dtype), None, None


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that keeps a bf16/fp16 input in its dtype under autocast (statistics still in fp32).

    Autocast runs group_norm in fp32, so each normalisation would read bf16 and write fp32, SiLU and
    dropout would run on fp32, and the next conv would cast back to bf16: twice the memory traffic on
    the elementwise half of the net. Here the kernel reads the bf16 input, accumulates mean and
    variance in fp32, and writes bf16, which the next conv would round to anyway. On CPU the affine
    parameters stay fp32 (a mixed-type kernel); elsewhere they are cast as autocast casts conv weights.
    Without autocast, or with an fp32 input, this is nn.GroupNorm exactly.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        if x.dtype not in (torch.bfloat16, torch.float16) or not torch.is_autocast_enabled(device):
            return super().forward(x)
        weight, bias = self.weight, self.bias
        with torch.autocast(device, enabled=False):
            if device == "cpu" and weight is not None and is_channels_last(x):
                return _GroupNormChannelsLastCPU.apply(x, weight, bias, self.num_groups, self.eps)
            if device != "cpu" and weight is not None:
                weight, bias = weight.to(x.dtype), bias.to(x.dtype)
            return F.group_norm(x, self.num_groups, weight, bias, self.eps)


def is_channels_last(x: torch.Tensor) -> bool:
    """True when x is a 4-D tensor stored NHWC and not also plain contiguous (C == 1 or H * W == 1 make both true)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


class ResBlock(nn.Module):
    """Wide-ResNet block with the time embedding added after the first conv (Ho et al. 2020, appendix B).

    GroupNorm -> SiLU -> Conv3x3 -> + Linear(SiLU(temb)) -> GroupNorm -> SiLU -> Dropout -> Conv3x3,
    plus the input (through a 1x1 conv when the width changes). The last conv starts at zero, so the
    block starts as the identity, as in the paper's code.
    """

    def __init__(
        self, in_ch: int, out_ch: int, temb_dim: int, dropout: float, norm_groups: int, use_checkpoint: bool = False,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.norm1 = GroupNorm(norm_groups, in_ch, eps=norm_eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, out_ch)
        self.norm2 = GroupNorm(norm_groups, out_ch, eps=norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            # recompute activations in backward; RNG state is restored, so dropout masks match
            return checkpoint(self._forward, x, temb, use_reentrant=False)
        return self._forward(x, temb)

    def _forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out_ch, H, W)
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]  # (B, out_ch, 1, 1) broadcast over H, W
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))  # (B, out_ch, H, W)
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Self-attention over the H*W positions with a residual connection (Ho et al. 2020, appendix B).

    GroupNorm -> 1x1 conv to q, k, v -> scaled dot-product attention (`num_heads` heads) -> 1x1 conv
    (zero-initialised) -> + input.
    """

    def __init__(self, ch: int, norm_groups: int, num_heads: int = 1, norm_eps: float = 1e-5):
        super().__init__()
        self.num_heads = num_heads
        self.norm = GroupNorm(norm_groups, ch, eps=norm_eps)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        nh = self.num_heads
        qkv = self.qkv(self.norm(x)).reshape(B, 3, nh, C // nh, H * W)  # (B, 3, nh, hs, HW)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # 3 x (B, nh, HW, hs)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, nh, HW, hs)
        if x.is_contiguous(memory_format=torch.channels_last):  # keep the layout: a view for one head
            h = h.transpose(1, 2).reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W), channels_last
        else:
            h = h.transpose(-1, -2).reshape(B, C, H, W)  # (B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv: padded by one pixel on every side (padding=1, improved-diffusion's),
    or by one on the right and bottom only (padding=0: TensorFlow's "SAME", the paper's code and diffusers'
    `downsample_padding=0`)."""

    def __init__(self, ch: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour upsampling, then a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class EmbedSequential(nn.Sequential):
    """A sequence of layers in which the residual blocks also receive the time embedding."""

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, temb) if isinstance(layer, ResBlock) else layer(x)
        return x


class UNet(nn.Module):
    """The DDPM eps-network (Ho et al. 2020, appendix B): eps_theta(x_t, t[, y]).

    The defaults are the paper's CIFAR-10 model: 32x32x3, base width 128, channel multipliers
    (1, 2, 2, 2), two residual blocks per resolution, self-attention at 16x16, dropout 0.1 (35.7M
    parameters). Its LSUN / CelebA-HQ models use 256 px, (1, 1, 2, 2, 4, 4) and dropout 0.

    Args:
        image_size: height = width of the input, in pixels.
        in_channels: channels of x_t.
        out_channels: channels of the prediction; None means `in_channels`.
        base_channels: width of the first level; the time embedding has 4 * base_channels.
        channel_mult: width of each level as a multiple of base_channels; the net downsamples
            len(channel_mult) - 1 times.
        num_res_blocks: residual blocks per level on the way down (the way up has one more).
        attention_resolutions: feature-map sizes, in pixels, that get self-attention after each
            residual block (16 means the 16x16 maps). The middle block always has one.
        dropout: dropout probability inside the residual blocks.
        norm_groups: GroupNorm groups; every width must be divisible by it.
        num_classes: None for an unconditional model; otherwise labels 0..num_classes-1 plus a null
            label `num_classes` (classifier-free guidance) are embedded and added to the time embedding.
        num_heads: attention heads (the paper uses 1).
        use_checkpoint: recompute residual-block activations in backward (less memory, more compute).
        norm_eps: GroupNorm's epsilon (1e-5; the paper's code and diffusers' ddpm-cifar10-32 use 1e-6).
        embed_cos_first, embed_freq_shift: the sinusoidal time embedding's layout (timestep_embedding):
            [cos, sin] with shift 0 (improved-diffusion's, the default), or [sin, cos] with shift 1 (the paper's).
        downsample_padding: 1 (symmetric) or 0 (right and bottom only, the paper's); see Downsample.
    """

    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 3,
        out_channels: int | None = None,
        base_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        norm_groups: int = 32,
        num_classes: int | None = None,
        num_heads: int = 1,
        use_checkpoint: bool = False,
        norm_eps: float = 1e-5,
        embed_cos_first: bool = True,
        embed_freq_shift: int = 0,
        downsample_padding: int = 1,
    ):
        super().__init__()
        channel_mult = tuple(int(m) for m in channel_mult)
        attention_resolutions = tuple(int(r) for r in attention_resolutions)
        out_channels = in_channels if out_channels is None else out_channels
        check_geometry(
            image_size, in_channels, out_channels, base_channels, channel_mult, num_res_blocks,
            attention_resolutions, dropout, norm_groups, num_classes, num_heads, norm_eps=norm_eps,
            embed_freq_shift=embed_freq_shift, downsample_padding=downsample_padding,
        )  # fmt: skip
        self.image_size = image_size
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_classes = num_classes

        temb_dim = 4 * base_channels
        self.base_channels = base_channels
        self.embed_cos_first, self.embed_freq_shift = embed_cos_first, embed_freq_shift
        self.time_embed = nn.Sequential(
            nn.Linear(base_channels, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim)
        )  # (B, base) -> (B, 4*base)
        self.class_embed = nn.Embedding(num_classes + 1, temb_dim) if num_classes is not None else None

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, temb_dim, dropout, norm_groups, use_checkpoint, norm_eps)

        def attn(ch: int) -> AttnBlock:
            return AttnBlock(ch, norm_groups, num_heads, norm_eps)

        # way down: one skip per residual block, plus the stem and every downsample output
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_chs = [base_channels]
        ch, res_px = base_channels, image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                block = EmbedSequential(res(ch, base_channels * mult))
                ch = base_channels * mult
                if res_px in attention_resolutions:
                    block.append(attn(ch))
                self.down.append(block)
                skip_chs.append(ch)
            if level != len(channel_mult) - 1:
                self.down.append(EmbedSequential(Downsample(ch, downsample_padding)))
                skip_chs.append(ch)
                res_px //= 2

        self.mid = EmbedSequential(res(ch, ch), attn(ch), res(ch, ch))

        # way up: num_res_blocks + 1 blocks per level, each consuming one skip
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                block = EmbedSequential(res(ch + skip_chs.pop(), base_channels * mult))
                ch = base_channels * mult
                if res_px in attention_resolutions:
                    block.append(attn(ch))
                if level != 0 and i == num_res_blocks:
                    block.append(Upsample(ch))
                    res_px *= 2
                self.up.append(block)

        self.norm_out = GroupNorm(norm_groups, ch, eps=norm_eps)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)
        self._init_weights()

    def _init_weights(self) -> None:
        """The paper code's init: Xavier-uniform weights, zero biases, and zero for the last conv of
        every residual block, the attention output and the final conv (the net starts at eps = 0)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, ResBlock):
                nn.init.zeros_(m.conv2.weight)
            elif isinstance(m, AttnBlock):
                nn.init.zeros_(m.proj_out.weight)
        nn.init.zeros_(self.conv_out.weight)

    def num_params(self) -> int:
        """Number of parameters (all are trainable)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Predict eps from x_t.

        x: (B, in_channels, H, W) noisy images, H = W = image_size.
        t: (B,) or scalar timesteps, int or float.
        y: (B,) int64 class labels in [0, num_classes]; `num_classes` is the null label, and None means
           all null. Only for a model built with num_classes.
        Returns (B, out_channels, H, W) in the dtype of the weights.
        """
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(B)
        dtype = self.conv_in.weight.dtype  # bf16/fp16 when the module was cast (bf16-true); inputs follow it
        x = x.to(dtype)
        emb = timestep_embedding(t, self.base_channels, cos_first=self.embed_cos_first, freq_shift=self.embed_freq_shift)
        temb = self.time_embed(emb.to(dtype))  # (B, 4*base)
        if self.class_embed is None:
            if y is not None:
                raise ValueError("UNet: got class labels y, but the model was built with num_classes=None")
        else:
            if y is None:
                y = torch.full((B,), self.num_classes, dtype=torch.long, device=x.device)  # all null
            temb = temb + self.class_embed(y)  # (B, 4*base)

        h = self.conv_in(x)  # (B, base, H, W)
        hs = [h]
        for block in self.down:
            h = block(h, temb)
            hs.append(h)
        h = self.mid(h, temb)  # (B, base*mult[-1], H / 2**(levels-1), ...)
        for block in self.up:
            h = block(torch.cat([h, hs.pop()], dim=1), temb)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_channels, H, W)


def unet_arguments(given: Mapping[str, Any]) -> dict[str, Any]:
    """Every UNet argument: those in `given`, the UNet's defaults for the rest."""
    return {name: p.default for name, p in inspect.signature(UNet).parameters.items()} | dict(given)


class GeometryError(ValueError):
    """A UNet argument that cannot build or run: `arg` (its name), `value`, and what is `accepted`."""

    def __init__(self, arg: str, value: object, accepted: str) -> None:
        super().__init__(f"UNet: {arg}={value} is invalid: expected {accepted}")
        self.arg, self.value, self.accepted = arg, value, accepted


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def check_geometry(
    image_size: int,
    in_channels: int,
    out_channels: int | None,
    base_channels: int,
    channel_mult: Sequence[int],
    num_res_blocks: int,
    attention_resolutions: Sequence[int],
    dropout: float,
    norm_groups: int,
    num_classes: int | None,
    num_heads: int,
    norm_eps: float = 1e-5,
    embed_freq_shift: int = 0,
    downsample_padding: int = 1,
    names: Callable[[str], str] = str,
) -> None:
    """Raise GeometryError at the first UNet argument that cannot be built or run. The one rule for the UNet and for
    the config validator (ddpm.schema.check_model), which passes `names` to show each argument by its config key.
    `out_channels` None means "as in_channels"."""
    counts = dict(image_size=image_size, in_channels=in_channels, base_channels=base_channels, num_res_blocks=num_res_blocks,
                  norm_groups=norm_groups, num_heads=num_heads)  # fmt: skip
    for name, value in counts.items():
        if not _is_count(value):
            raise GeometryError(names(name), value, "an integer >= 1")
    if not (isinstance(channel_mult, Sequence) and len(channel_mult) >= 1 and all(_is_count(m) for m in channel_mult)):
        raise GeometryError(names("channel_mult"), channel_mult, "a non-empty list of integers >= 1")
    downsamplings = len(channel_mult) - 1
    if image_size % 2**downsamplings:
        raise GeometryError(names("image_size"), image_size, f"a multiple of {2**downsamplings}: "
                            f"{names('channel_mult')}={list(channel_mult)} halves it {downsamplings} time(s)")  # fmt: skip
    if base_channels % norm_groups:  # every width is base_channels * an integer, so this covers them all
        raise GeometryError(names("norm_groups"), norm_groups, f"a divisor of {names('base_channels')}={base_channels} "
                            "(GroupNorm splits every width base_channels x mult into groups)")  # fmt: skip
    resolutions = [image_size // 2**i for i in range(len(channel_mult))]
    if not all(r in resolutions for r in attention_resolutions):
        raise GeometryError(names("attention_resolutions"), attention_resolutions,
                            f"sizes the UNet visits at {names('image_size')}={image_size}: a subset of {resolutions}")  # fmt: skip
    attended = {base_channels * m for m, r in zip(channel_mult, resolutions) if r in attention_resolutions}
    widths = sorted(attended | {base_channels * channel_mult[-1]})  # the attention blocks' widths (the middle one always)
    if any(w % num_heads for w in widths):
        raise GeometryError(names("num_heads"), num_heads, f"a divisor of every attention width {widths}")
    if not (isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0.0 <= dropout < 1.0):
        raise GeometryError(names("dropout"), dropout, "a number in [0, 1)")
    if out_channels is not None and not _is_count(out_channels):
        raise GeometryError(names("out_channels"), out_channels, "null (as in_channels, or what module.variance needs) or an integer >= 1")
    if num_classes is not None and not _is_count(num_classes):
        raise GeometryError(names("num_classes"), num_classes, "null (unconditional) or an integer >= 1")
    if not (isinstance(norm_eps, (int, float)) and not isinstance(norm_eps, bool) and norm_eps > 0):
        raise GeometryError(names("norm_eps"), norm_eps, "a number > 0")
    if embed_freq_shift not in (0, 1) or isinstance(embed_freq_shift, bool):
        raise GeometryError(names("embed_freq_shift"), embed_freq_shift, "0 or 1")
    if downsample_padding not in (0, 1) or isinstance(downsample_padding, bool):
        raise GeometryError(names("downsample_padding"), downsample_padding, "0 (right and bottom) or 1 (every side)")
