"""Dynamic token mixers that compete with ContMix (the paper's Table 7), as plain modules.

Every mixer maps (B, C, H, W) -> (B, C, H, W) at any H, W >= 1, so one network can swap them by
configuration (the mixer registry builds them by these names and keyword arguments):
- `NeighborhoodAttention`: NAT, on overlock's own kernel (kernels.neighborhood_attention);
- `WindowAttention`: Swin's (shifted) window attention, through scaled_dot_product_attention;
- `Involution`: a K x K kernel generated per position, shared over channel groups (kernels.aggregate);
- `DynamicConv`: DyConv, separable: a per-sample mixture of depthwise kernels, then pointwise;
- `ODConv`: DyConv plus spatial and channel attentions on the mixed depthwise kernel;
- `OutlookAttention`: VOLO's outlook attention (window attention generated from the centre token).

Maps smaller than the window. The clamped-window kernels need H, W >= K (times the dilation): the
two mixers built on them pad the map with zeros at the bottom and right up to that size, mix, and
crop, exactly as NAT's NeighborhoodAttention2D does (the padded positions get the 1x1 layers'
biases and take part as neighbours). Window attention follows Swin instead: a map no larger than
the window is one window (window = min(window_size, H, W), no shift). Dynamic conv zero-pads like
any convolution, and so does outlook attention (VOLO's unfold/fold). At the paper's 224 x 224 input no stage is smaller than 7 x 7, so none of this
changes the reported numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_divides(width: int, name: str, value: int) -> None:
    _check_positive(name, value)
    if width % value:
        raise ValueError(f"width={width} must be divisible by {name}={value}")


def _check_odd(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % 2 == 0:
        raise ValueError(f"{name} must be an odd positive int, got {value!r}")


def _pad_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad (B, C, H, W) at the bottom and right to at least size x size."""
    height, width = x.shape[-2:]
    if height >= size and width >= size:
        return x
    return F.pad(x, (0, max(0, size - width), 0, max(0, size - height)))


def with_projections(mixer: nn.Module, width: int) -> nn.Sequential:
    """mixer between two 1x1 convs (in, mixer, out), the frame attention mixers have built in (qkv, proj):
    with it a convolutional mixer stands in the same place as attention in a Swin-like block."""
    return nn.Sequential(nn.Conv2d(width, width, 1), mixer, nn.Conv2d(width, width, 1))


class NeighborhoodAttention(nn.Module):
    """NAT's 2-D neighbourhood attention: every position attends to its clamped K x K window.

    1x1 qkv, queries scaled by head_dim**-0.5, softmax(q . k + relative position bias) over the
    window, 1x1 projection. Windows near a border slide inwards (K*K real neighbours, NAT
    semantics); dilation d takes every d-th position (NAT's dilated windows).
    """

    def __init__(
        self,
        width: int,
        *,
        kernel_size: int = 7,
        heads: int,
        dilation: int = 1,
        qkv_bias: bool = True,
        rel_pos_bias: bool = True,
    ) -> None:
        super().__init__()
        _check_odd("kernel_size", kernel_size)
        _check_divides(width, "heads", heads)
        _check_positive("dilation", dilation)
        self.kernel_size, self.heads, self.dilation = kernel_size, heads, dilation
        self.scale = (width // heads) ** -0.5
        self.qkv = nn.Conv2d(width, 3 * width, 1, bias=qkv_bias)
        self.proj = nn.Conv2d(width, width, 1)
        self.rpb = None
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.empty(heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
            nn.init.trunc_normal_(self.rpb, std=0.02)
        self.backend = "auto"  # kernels backend name; "reference"/"unfold" for comparisons

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        x = _pad_to(x, self.kernel_size * self.dilation)
        batch, channels, padded_h, padded_w = x.shape
        qkv = self.qkv(x).reshape(batch, 3, self.heads, channels // self.heads, padded_h, padded_w)
        q, k, v = qkv.permute(1, 0, 2, 4, 5, 3).unbind(0)  # (B, heads, H, W, head_dim) each
        out = kernels.neighborhood_attention(
            q * self.scale, k, v, self.rpb, self.kernel_size, dilation=self.dilation, backend=self.backend
        )
        out = out.permute(0, 1, 4, 2, 3).reshape(batch, channels, padded_h, padded_w)
        return self.proj(out[:, :, :height, :width])


def _window_labels(length: int, window: int, shift: int, device) -> torch.Tensor:
    """Swin's region label of each position along one axis of the shifted map: 0, 1, 2 for the slices
    [0, -window), [-window, -shift), [-shift, end), so that tokens rolled in from the other side of the
    map never attend to their new neighbours."""
    index = torch.arange(length, device=device)
    return (index >= length - window).long() + (index >= length - shift).long()


class WindowAttention(nn.Module):
    """Swin's window attention: non-overlapping windows, relative position bias, optional shift.

    With shift=True the map is rolled by window//2 before partitioning and back afterwards, and an
    attention mask keeps tokens of different (pre-roll) regions apart, as in Swin; the builder sets
    shift on every other block. A map that is not a multiple of the window is zero-padded at the
    bottom and right (the padded tokens take part, as in Swin); a map no larger than the window is
    one window of min(window_size, H, W) and is never shifted (Swin's rule), which reads the
    centre of the bias table.
    """

    def __init__(self, width: int, *, window_size: int = 7, heads: int, shift: bool = False, qkv_bias: bool = True):
        super().__init__()
        _check_positive("window_size", window_size)
        _check_divides(width, "heads", heads)
        self.window_size, self.heads, self.shift = window_size, heads, bool(shift)
        self.qkv = nn.Conv2d(width, 3 * width, 1, bias=qkv_bias)
        self.proj = nn.Conv2d(width, width, 1)
        self.rpb = nn.Parameter(torch.empty(heads, 2 * window_size - 1, 2 * window_size - 1))
        nn.init.trunc_normal_(self.rpb, std=0.02)

    def attention_mask(self, padded_h: int, padded_w: int, window: int, shift: int) -> torch.Tensor:
        """(nW or 1, heads, N, N) additive mask: relative position bias, plus -inf across shifted regions."""
        offsets = torch.arange(window, device=self.rpb.device)
        rows = offsets.repeat_interleave(window)  # row of each token in a window, N = window**2
        cols = offsets.repeat(window)
        base = self.window_size - 1
        bias = self.rpb[:, base + rows[:, None] - rows[None, :], base + cols[:, None] - cols[None, :]]
        if not shift:
            return bias.unsqueeze(0)
        labels = 3 * _window_labels(padded_h, window, shift, self.rpb.device)[:, None]
        labels = labels + _window_labels(padded_w, window, shift, self.rpb.device)[None, :]
        labels = labels.reshape(padded_h // window, window, padded_w // window, window).transpose(1, 2)
        labels = labels.reshape(-1, window * window)  # (nW, N)
        blocked = labels[:, :, None] != labels[:, None, :]
        mask = torch.zeros(blocked.shape, dtype=bias.dtype, device=bias.device).masked_fill(blocked, float("-inf"))
        return bias.unsqueeze(0) + mask.unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        window = min(self.window_size, height, width)
        shift = window // 2 if self.shift and min(height, width) > self.window_size else 0
        x = F.pad(x, (0, -width % window, 0, -height % window))
        padded_h, padded_w = x.shape[-2:]
        if shift:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(2, 3))
        qkv = self.qkv(x)  # 1x1: commutes with padding and rolling
        n_h, n_w, head_dim = padded_h // window, padded_w // window, channels // self.heads
        qkv = qkv.reshape(batch, 3, self.heads, head_dim, n_h, window, n_w, window)
        qkv = qkv.permute(1, 0, 4, 6, 2, 5, 7, 3).reshape(3, batch, n_h * n_w, self.heads, window * window, head_dim)
        mask = self.attention_mask(padded_h, padded_w, window, shift).to(qkv.dtype)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask)  # scale head_dim**-0.5
        out = out.reshape(batch, n_h, n_w, self.heads, window, window, head_dim)
        out = out.permute(0, 3, 6, 1, 4, 2, 5).reshape(batch, channels, padded_h, padded_w)
        if shift:
            out = torch.roll(out, shifts=(shift, shift), dims=(2, 3))
        return self.proj(out[:, :, :height, :width])


class Involution(nn.Module):
    """Involution: a K x K kernel generated at every position from that position's features
    (1x1 reduce -> BN -> ReLU -> 1x1 to G*K*K), shared by the channels of each of the G groups.

    The aggregation is `kernels.aggregate` over clamped windows, not the original zero padding:
    near a border the window slides inwards, so every position mixes K*K real neighbours (with
    zero padding a corner sees only (K//2+1)^2 of them plus zeros). Chosen because it is the
    window the fast kernels (CPU tiles, Triton) implement, with no padded copy of the map and
    the same border semantics as ContMix and NAT in the same comparison.
    """

    def __init__(self, width: int, *, kernel_size: int = 7, group_channels: int = 16, reduction: int = 4) -> None:
        super().__init__()
        _check_odd("kernel_size", kernel_size)
        _check_divides(width, "group_channels", group_channels)
        _check_positive("reduction", reduction)
        self.kernel_size, self.groups = kernel_size, width // group_channels
        hidden = max(1, width // reduction)
        self.reduce = nn.Sequential(nn.Conv2d(width, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU())
        self.span = nn.Conv2d(hidden, self.groups * kernel_size * kernel_size, 1)
        self.backend = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        x = _pad_to(x, self.kernel_size)
        batch, channels, padded_h, padded_w = x.shape
        kernel = self.span(self.reduce(x)).reshape(batch, self.groups, -1, padded_h, padded_w).permute(0, 1, 3, 4, 2)
        value = x.reshape(batch, self.groups, channels // self.groups, padded_h, padded_w).permute(0, 1, 3, 4, 2)
        out = kernels.aggregate(kernel, value, self.kernel_size, backend=self.backend)
        out = out.permute(0, 1, 4, 2, 3).reshape(batch, channels, padded_h, padded_w)
        return out[:, :, :height, :width]


def _check_kernel_bank(kernel_size: int, num_kernels: int, reduction: int, temperature: float) -> None:
    """The arguments DyConv and ODConv share: an odd kernel, a bank, a reduction, a temperature > 0."""
    _check_odd("kernel_size", kernel_size)
    _check_positive("num_kernels", num_kernels)
    _check_positive("reduction", reduction)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")


def kernel_bank(num_kernels: int, width: int, kernel_size: int) -> nn.Parameter:
    """A bank of `num_kernels` depthwise K x K kernels (num_kernels, C, 1, K, K), each initialised as
    nn.Conv2d initialises its own weight."""
    bank = nn.Parameter(torch.empty(num_kernels, width, 1, kernel_size, kernel_size))
    for kernel in bank:
        nn.init.kaiming_uniform_(kernel, a=5**0.5)
    return bank


def per_sample_depthwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A depthwise conv with a different (C, 1, K, K) kernel per sample (weight (B, C, 1, K, K), bias
    (B, C)), 'same' padding: the batch runs as one convolution with B * C groups, no loop over samples."""
    batch, channels, height, width = x.shape
    size = weight.shape[-1]
    out = F.conv2d(
        x.reshape(1, batch * channels, height, width),
        weight.reshape(batch * channels, 1, size, size),
        None if bias is None else bias.reshape(batch * channels),
        padding=size // 2,
        groups=batch * channels,
    )
    return out.reshape(batch, channels, height, width)


class DynamicConv(nn.Module):
    """DyConv, separable: per sample, a softmax(logits / temperature) mixture of a bank of
    `num_kernels` depthwise K x K kernels (attention from global average pooling -> 1x1 -> ReLU
    -> 1x1), applied as one grouped convolution, then a pointwise convolution.

    The attention is computed per sample, so the mixed kernels form a (B * C, 1, K, K) weight and
    the whole batch runs as one convolution with B * C groups (no loop over samples).
    """

    def __init__(
        self, width: int, *, kernel_size: int = 7, num_kernels: int = 4, reduction: int = 4, temperature: float = 1.0
    ) -> None:
        super().__init__()
        _check_kernel_bank(kernel_size, num_kernels, reduction, temperature)
        self.kernel_size, self.temperature = kernel_size, float(temperature)
        hidden = max(1, width // reduction)
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(width, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, num_kernels, 1)
        )
        self.weight = kernel_bank(num_kernels, width, kernel_size)
        self.bias = nn.Parameter(torch.zeros(num_kernels, width))
        self.pointwise = nn.Conv2d(width, width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attention = (self.attention(x).flatten(1) / self.temperature).softmax(-1)  # (B, num_kernels)
        weight = torch.einsum("bn,nckij->bckij", attention, self.weight)
        return self.pointwise(per_sample_depthwise(x, weight, attention @ self.bias))


class ODConv(nn.Module):
    """ODConv (omni-dimensional dynamic convolution), depthwise-separable like `DynamicConv`.

    Besides DyConv's softmax(logits / temperature) over the bank of `num_kernels` depthwise kernels,
    a sigmoid attention over the K x K spatial positions of the kernel and one over the channels (for a
    depthwise kernel the input- and output-channel attentions coincide; as in the ODConv code, it
    scales the input). All three come from one squeezed vector: global average pooling -> 1x1 -> ReLU.
    The original puts a BatchNorm after that 1x1; on a (B, hidden, 1, 1) vector it fails at batch 1 in
    training, so it is left out here.
    """

    def __init__(
        self, width: int, *, kernel_size: int = 7, num_kernels: int = 4, reduction: int = 4, temperature: float = 1.0
    ) -> None:
        super().__init__()
        _check_kernel_bank(kernel_size, num_kernels, reduction, temperature)
        self.kernel_size, self.temperature = kernel_size, float(temperature)
        hidden = max(1, width // reduction)
        self.squeeze = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(width, hidden, 1), nn.ReLU())
        self.channel_attention = nn.Conv2d(hidden, width, 1)
        self.spatial_attention = nn.Conv2d(hidden, kernel_size * kernel_size, 1)
        self.kernel_attention = nn.Conv2d(hidden, num_kernels, 1)
        self.weight = kernel_bank(num_kernels, width, kernel_size)
        self.pointwise = nn.Conv2d(width, width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, k = x.shape[0], self.kernel_size
        squeezed = self.squeeze(x)
        channel = self.channel_attention(squeezed).sigmoid()  # (B, C, 1, 1)
        spatial = self.spatial_attention(squeezed).sigmoid().reshape(batch, 1, 1, k, k)
        mixture = (self.kernel_attention(squeezed).flatten(1) / self.temperature).softmax(-1)  # (B, num_kernels)
        weight = torch.einsum("bn,nckij->bckij", mixture, self.weight) * spatial
        return self.pointwise(per_sample_depthwise(x * channel, weight))


class OutlookAttention(nn.Module):
    """VOLO's outlook attention: each window centre generates, from its own features alone, a
    (K*K x K*K) attention per head that mixes the window's values into every slot of the window; the
    overlapping windows are then summed back (fold).

    Zero padding and F.unfold / F.fold as in VOLO (K = 3 there, so the K*K copies of the values are
    small); `stride` > 1 generates attention on an average-pooled grid (ceil mode) and folds with
    that stride, as VOLO's first stage does. scale = head_dim**-0.5.
    """

    def __init__(self, width: int, *, kernel_size: int = 3, heads: int, stride: int = 1, qkv_bias: bool = False):
        super().__init__()
        _check_odd("kernel_size", kernel_size)
        _check_divides(width, "heads", heads)
        _check_positive("stride", stride)
        self.kernel_size, self.heads, self.stride = kernel_size, heads, stride
        self.scale = (width // heads) ** -0.5
        self.value = nn.Conv2d(width, width, 1, bias=qkv_bias)
        self.attention = nn.Conv2d(width, heads * kernel_size**4, 1)
        self.proj = nn.Conv2d(width, width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        k, s, heads = self.kernel_size, self.stride, self.heads
        kk, head_dim = k * k, channels // heads
        value = F.unfold(self.value(x), k, padding=k // 2, stride=s)  # (B, C*K*K, L)
        value = value.reshape(batch, heads, head_dim, kk, -1).permute(0, 1, 4, 3, 2)  # (B, heads, L, K*K, hd)
        pooled = F.avg_pool2d(x, s, s, ceil_mode=True) if s > 1 else x
        attention = self.attention(pooled).reshape(batch, heads, kk, kk, -1).permute(0, 1, 4, 2, 3)
        attention = (attention * self.scale).softmax(-1)  # (B, heads, L, K*K target slots, K*K source slots)
        out = torch.matmul(attention, value).permute(0, 1, 4, 3, 2).reshape(batch, channels * kk, -1)
        out = F.fold(out, (height, width), k, padding=k // 2, stride=s)
        return self.proj(out)
