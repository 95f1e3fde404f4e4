"""The Table 7 mixers (builder/mixers_attention.py) against straightforward references written out
here (loops over positions, windows and samples), forward and gradients; shapes at odd, non-square
and smaller-than-window sizes; constructor errors; torch.compile; fvcore counts."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from fvcore.nn import FlopCountAnalysis

from overlock.builder.flops import OVERLOCK_HANDLES
from overlock.builder.mixers_attention import (
    DynamicConv,
    Involution,
    NeighborhoodAttention,
    ODConv,
    OutlookAttention,
    WindowAttention,
)


def clamp_start(index: int, length: int, k: int) -> int:
    return min(max(index - k // 2, 0), length - k)


def pad_to(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.pad(x, (0, max(0, size - x.shape[-1]), 0, max(0, size - x.shape[-2])))


# --- references ---------------------------------------------------------------------------------


def neighborhood_reference(m: NeighborhoodAttention, x: torch.Tensor) -> torch.Tensor:
    """Pad to K, 1x1 qkv, then per position: softmax over the clamped window's q.k + bias, sum of v."""
    height, width = x.shape[-2:]
    k = m.kernel_size
    x = pad_to(x, k)
    batch, channels, ph, pw = x.shape
    head_dim = channels // m.heads
    q, key, value = F.conv2d(x, m.qkv.weight, m.qkv.bias).reshape(batch, 3, m.heads, head_dim, ph, pw).unbind(1)
    out = torch.zeros(batch, m.heads, head_dim, ph, pw)
    rows = []
    for i in range(ph):
        row = []
        for j in range(pw):
            si, sj = clamp_start(i, ph, k), clamp_start(j, pw, k)
            keys = key[..., si : si + k, sj : sj + k].flatten(-2)  # (B, heads, hd, K*K)
            logits = (q[..., i, j, None] * keys).sum(2) * head_dim**-0.5
            if m.rpb is not None:
                bias = m.rpb[:, k - 1 + si - i : 2 * k - 1 + si - i, k - 1 + sj - j : 2 * k - 1 + sj - j]
                logits = logits + bias.flatten(-2)
            probs = logits.softmax(-1)
            row.append((probs[:, :, None] * value[..., si : si + k, sj : sj + k].flatten(-2)).sum(-1))
        rows.append(torch.stack(row, -1))
    out = torch.stack(rows, -2).reshape(batch, channels, ph, pw)[..., :height, :width]
    return F.conv2d(out, m.proj.weight, m.proj.bias)


def window_reference(m: WindowAttention, x: torch.Tensor) -> torch.Tensor:
    """Swin as its paper code writes it: pad, roll, img_mask from slices, per-window attention with -100 masks."""
    batch, channels, height, width = x.shape
    ws = min(m.window_size, height, width)
    shift = ws // 2 if m.shift and min(height, width) > m.window_size else 0
    x = F.pad(x, (0, (ws - width % ws) % ws, 0, (ws - height % ws) % ws))
    ph, pw = x.shape[-2:]
    if shift:
        x = torch.roll(x, (-shift, -shift), (2, 3))
        img_mask = torch.zeros(ph, pw)
        label = 0
        for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            for vs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
                img_mask[hs, vs] = label
                label += 1
    head_dim = channels // m.heads
    qkv = F.conv2d(x, m.qkv.weight, m.qkv.bias).reshape(batch, 3, m.heads, head_dim, ph, pw)
    out = torch.zeros(batch, m.heads, head_dim, ph, pw)
    coords = [(a, b) for a in range(ws) for b in range(ws)]
    base = m.window_size - 1
    bias = torch.stack(
        [torch.stack([m.rpb[:, base + a - c, base + b - d] for (c, d) in coords], -1) for (a, b) in coords], -2
    )
    for wi in range(0, ph, ws):
        for wj in range(0, pw, ws):
            q, k, v = (qkv[:, n, :, :, wi : wi + ws, wj : wj + ws].flatten(-2) for n in range(3))  # (B, h, hd, N)
            logits = (q.transpose(-1, -2) * head_dim**-0.5) @ k + bias
            if shift:
                labels = img_mask[wi : wi + ws, wj : wj + ws].flatten()
                logits = logits + (labels[:, None] != labels[None, :]).float() * -100.0
            attended = logits.softmax(-1) @ v.transpose(-1, -2)  # (B, h, N, hd)
            out[..., wi : wi + ws, wj : wj + ws] = attended.transpose(-1, -2).reshape(batch, m.heads, head_dim, ws, ws)
    out = out.reshape(batch, channels, ph, pw)
    if shift:
        out = torch.roll(out, (shift, shift), (2, 3))
    return F.conv2d(out[..., :height, :width], m.proj.weight, m.proj.bias)


def involution_reference(m: Involution, x: torch.Tensor) -> torch.Tensor:
    """Pad to K, generate the kernels, then per position the clamped window times its own kernel."""
    height, width = x.shape[-2:]
    k, groups = m.kernel_size, m.groups
    x = pad_to(x, k)
    batch, channels, ph, pw = x.shape
    kernel = m.span(m.reduce(x)).reshape(batch, groups, k, k, ph, pw)
    grouped = x.reshape(batch, groups, channels // groups, ph, pw)
    rows = []
    for i in range(ph):
        row = []
        for j in range(pw):
            si, sj = clamp_start(i, ph, k), clamp_start(j, pw, k)
            window = grouped[..., si : si + k, sj : sj + k]  # (B, G, gc, K, K)
            row.append((window * kernel[:, :, None, :, :, i, j]).sum((-1, -2)))
        rows.append(torch.stack(row, -1))
    return torch.stack(rows, -2).reshape(batch, channels, ph, pw)[..., :height, :width]


def dynamic_reference(m: DynamicConv, x: torch.Tensor) -> torch.Tensor:
    """Per sample: attention over the bank, the mixed depthwise conv, then the pointwise conv."""
    outs = []
    fc1, fc2 = m.attention[1], m.attention[3]
    for sample in x:
        pooled = sample.mean((1, 2))[None, :, None, None]
        logits = F.conv2d(F.relu(F.conv2d(pooled, fc1.weight, fc1.bias)), fc2.weight, fc2.bias).flatten()
        attention = (logits / m.temperature).softmax(0)
        weight = sum(a * w for a, w in zip(attention, m.weight, strict=True))
        bias = sum(a * b for a, b in zip(attention, m.bias, strict=True))
        mixed = F.conv2d(sample[None], weight, bias, padding=m.kernel_size // 2, groups=x.shape[1])
        outs.append(F.conv2d(mixed, m.pointwise.weight, m.pointwise.bias))
    return torch.cat(outs)


def odconv_reference(m: ODConv, x: torch.Tensor) -> torch.Tensor:
    """Per sample: kernel mixture times the spatial attention, input scaled by the channel attention."""
    outs = []
    k = m.kernel_size
    for sample in x:
        z = m.squeeze(sample[None])
        channel = torch.sigmoid(F.conv2d(z, m.channel_attention.weight, m.channel_attention.bias))
        spatial = torch.sigmoid(F.conv2d(z, m.spatial_attention.weight, m.spatial_attention.bias)).reshape(k, k)
        logits = F.conv2d(z, m.kernel_attention.weight, m.kernel_attention.bias).flatten()
        mixture = (logits / m.temperature).softmax(0)
        weight = sum(a * w for a, w in zip(mixture, m.weight, strict=True)) * spatial
        mixed = F.conv2d(sample[None] * channel, weight, padding=k // 2, groups=x.shape[1])
        outs.append(F.conv2d(mixed, m.pointwise.weight, m.pointwise.bias))
    return torch.cat(outs)


def outlook_reference(m: OutlookAttention, x: torch.Tensor) -> torch.Tensor:
    """Loop over window centres (every stride-th position) and target slots; zero outside the map."""
    batch, channels, height, width = x.shape
    k, s, heads = m.kernel_size, m.stride, m.heads
    head_dim, r = channels // heads, k // 2
    value = F.conv2d(x, m.value.weight, m.value.bias).reshape(batch, heads, head_dim, height, width)
    value = F.pad(value, (r, r, r, r))  # padded coordinates: position p sits at p + r
    pooled = F.avg_pool2d(x, s, s, ceil_mode=True) if s > 1 else x
    logits = F.conv2d(pooled, m.attention.weight, m.attention.bias)
    logits = logits.reshape(batch, heads, k * k, k * k, *pooled.shape[-2:]) * head_dim**-0.5
    out = torch.zeros(batch, heads, head_dim, height + 2 * r, width + 2 * r)
    for ci in range(pooled.shape[-2]):
        for cj in range(pooled.shape[-1]):
            i, j = ci * s, cj * s  # the window centre
            window = value[..., i : i + k, j : j + k].flatten(-2)  # (B, heads, hd, K*K), zero outside
            probs = logits[..., ci, cj].softmax(-1)  # (B, heads, target, source)
            mixed = (probs[:, :, None] * window[:, :, :, None, :]).sum(-1)  # (B, heads, hd, target)
            out[..., i : i + k, j : j + k] += mixed.reshape(batch, heads, head_dim, k, k)
    out = out[..., r : r + height, r : r + width].reshape(batch, channels, height, width)
    return F.conv2d(out, m.proj.weight, m.proj.bias)


MIXERS = {
    "neighborhood": (lambda: NeighborhoodAttention(8, kernel_size=3, heads=2), neighborhood_reference),
    "neighborhood_k5_no_bias": (
        lambda: NeighborhoodAttention(6, kernel_size=5, heads=3, rel_pos_bias=False),
        neighborhood_reference,
    ),
    "window": (lambda: WindowAttention(8, window_size=3, heads=2), window_reference),
    "window_shifted": (lambda: WindowAttention(8, window_size=3, heads=2, shift=True), window_reference),
    "involution": (lambda: Involution(8, kernel_size=3, group_channels=4, reduction=2), involution_reference),
    "involution_k5": (lambda: Involution(6, kernel_size=5, group_channels=3), involution_reference),
    "dynamic_conv": (lambda: DynamicConv(8, kernel_size=3, num_kernels=3, temperature=2.0), dynamic_reference),
    "outlook": (lambda: OutlookAttention(8, kernel_size=3, heads=2), outlook_reference),
    "outlook_stride2": (lambda: OutlookAttention(8, kernel_size=3, heads=2, stride=2), outlook_reference),
    "odconv": (lambda: ODConv(8, kernel_size=3, num_kernels=3, temperature=2.0), odconv_reference),
}
SIZES = [(5, 7), (7, 5), (2, 3), (1, 1), (8, 9)]  # odd, non-square, smaller than the window, multi-window


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", list(MIXERS))
def test_mixer_matches_its_reference_forward_and_gradients(name, size):
    build, reference = MIXERS[name]
    torch.manual_seed(0)
    mixer = build().train()
    with torch.no_grad():  # non-trivial batch-norm statistics and biases
        for parameter in mixer.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    x = torch.randn(2, 6 if name.endswith("k5") or "k5_" in name else 8, *size)
    leaves = [x.requires_grad_(), *mixer.parameters()]
    out = mixer(x)
    assert out.shape == x.shape
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad, allow_unused=True)
    want_out = reference(mixer, x)
    want = torch.autograd.grad(want_out, leaves, grad, allow_unused=True)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    for index, (g, w) in enumerate(zip(got, want, strict=True)):
        if w is None:
            assert g is None or not g.any(), index
            continue
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4, msg=f"gradient {index}")


def test_shifted_window_mask_separates_rolled_regions():
    """At 6x6 with window 3 and shift 1 the bottom-right window mixes four regions: a token there
    must ignore a token from another region (changing it does not move the output)."""
    torch.manual_seed(0)
    mixer = WindowAttention(4, window_size=3, heads=1, shift=True)
    x = torch.randn(1, 4, 6, 6)
    y = x.clone()
    y[..., 0, 0] += (
        1.0  # rolled into the bottom-right window's corner, a different region from (5, 5)'s neighbour (4, 4)
    )
    out_x, out_y = mixer(x), mixer(y)
    torch.testing.assert_close(out_x[..., 4, 4], out_y[..., 4, 4])
    assert not torch.allclose(out_x[..., 0, 0], out_y[..., 0, 0])


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: NeighborhoodAttention(8, heads=3), "width=8 must be divisible by heads=3"),
        (lambda: NeighborhoodAttention(8, heads=2, kernel_size=4), "kernel_size must be an odd positive int"),
        (lambda: NeighborhoodAttention(8, heads=2, dilation=0), "dilation must be a positive int"),
        (lambda: WindowAttention(8, heads=2, window_size=0), "window_size must be a positive int"),
        (lambda: Involution(8, group_channels=3), "width=8 must be divisible by group_channels=3"),
        (lambda: DynamicConv(8, num_kernels=0), "num_kernels must be a positive int"),
        (lambda: DynamicConv(8, temperature=0.0), "temperature must be > 0"),
        (lambda: ODConv(8, kernel_size=2), "kernel_size must be an odd positive int"),
        (lambda: OutlookAttention(8, heads=2, stride=0), "stride must be a positive int"),
    ],
)
def test_constructors_reject_bad_arguments_naming_them(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_dilated_neighborhood_attention_runs_at_any_size():
    mixer = NeighborhoodAttention(8, kernel_size=3, heads=2, dilation=2)
    for size in ((1, 1), (5, 7), (9, 6)):
        assert mixer(torch.randn(1, 8, *size)).shape == (1, 8, *size)


def test_all_mixers_compile_fullgraph_forward_and_backward():
    """fullgraph=True fails on any graph break; aot_eager traces forward and backward graphs (through
    the custom ops' fake implementations) without inductor's code generation, which costs minutes for
    four mixers on two cores. Inductor on the neighbourhood op itself: test_neighborhood.py."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        NeighborhoodAttention(8, kernel_size=3, heads=2),
        NeighborhoodAttention(8, kernel_size=3, heads=2, dilation=2),  # 7x8: one call per residue class
        WindowAttention(8, window_size=3, heads=2, shift=True),
        Involution(8, kernel_size=3, group_channels=4),
        DynamicConv(8, kernel_size=3),
        ODConv(8, kernel_size=3),
        OutlookAttention(8, kernel_size=3, heads=2),
    ).eval()
    x = torch.randn(2, 8, 7, 8, requires_grad=True)
    eager = model(x)
    eager.square().sum().backward()
    want = [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]
    x.grad = None
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    for got, wanted in zip([x.grad] + [p.grad for p in model.parameters()], want, strict=True):
        torch.testing.assert_close(got, wanted, atol=1e-4, rtol=1e-4)


def flops_by_operator(mixer: torch.nn.Module, size: tuple[int, int], channels: int = 8) -> dict[str, int]:
    analysis = FlopCountAnalysis(torch.nn.Sequential(mixer).eval(), torch.zeros(1, channels, *size))
    for name, handle in OVERLOCK_HANDLES.items():
        analysis.set_op_handle(name, handle)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    analysis.tracer_warnings("none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return dict(analysis.by_operator())


def test_fvcore_counts_the_attention_and_aggregation_products():
    c, k, h, w = 8, 3, 6, 9
    conv1x1 = h * w * c * c
    counts = flops_by_operator(NeighborhoodAttention(c, kernel_size=k, heads=2), (h, w))
    assert counts["neighborhood_attention"] == h * w * k * k * 2 * c  # q.k and a.v, c = heads * head_dim
    assert counts["conv"] == 4 * conv1x1  # qkv (3) and proj (1)
    counts = flops_by_operator(WindowAttention(c, window_size=k, heads=2, shift=True), (h, w))
    assert counts["scaled_dot_product_attention"] == (h * w // k**2) * (k * k) ** 2 * 2 * c
    counts = flops_by_operator(Involution(c, kernel_size=k, group_channels=4, reduction=2), (h, w))
    assert counts["contmix"] == h * w * k * k * c  # the aggregation (kernels.aggregate's handle)
    assert counts["conv"] == h * w * (c * 4 + 4 * 2 * k * k)  # reduce to 4, span to G*K*K = 2*9
    counts = flops_by_operator(DynamicConv(c, kernel_size=k), (h, w))
    assert counts["conv"] == h * w * c * k * k + conv1x1 + c * 2 + 2 * 4  # dynamic dw, pointwise, attention fcs
    counts = flops_by_operator(ODConv(c, kernel_size=k), (h, w))
    assert counts["conv"] == h * w * c * k * k + conv1x1 + c * 2 + 2 * (c + k * k + 4)  # + the three attention heads
    counts = flops_by_operator(OutlookAttention(c, kernel_size=k, heads=2), (h, w))
    assert counts["matmul"] == h * w * (k * k) ** 2 * c  # every window's (K*K x K*K) attention times its values
