"""`contmix_block` (builder/contmix.py ContMixBlock): ContMix with the dynamic block's mixing branch
around it, self context. Against a reference written out here (functional convs, batch norms with
batch statistics, ContMix as per-position loops over clamped windows), forward and gradients, with
and without the optional parts; shapes at odd, non-square and smaller-than-kernel sizes; deploy
equivalence; the schema's rules; fvcore's count; torch.compile."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from fvcore.nn import FlopCountAnalysis

from overlock import archspec
from overlock.builder import build
from overlock.builder.contmix import ContMixBlock
from overlock.builder.flops import OVERLOCK_HANDLES
from overlock.errors import SpecError

CONTMIX_SPEC = "specs/paper/table7/contmix.yaml"


# --- reference ----------------------------------------------------------------------------------


def bn(x: torch.Tensor, norm: torch.nn.BatchNorm2d) -> torch.Tensor:
    """Training-mode batch norm: batch statistics, the module's affine parameters."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    return (x - mean) / (var + norm.eps).sqrt() * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)


def conv1x1(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    return torch.einsum("oi,bihw->bohw", conv.weight[:, :, 0, 0], x) + (
        0 if conv.bias is None else conv.bias.view(1, -1, 1, 1)
    )


def depthwise(x: torch.Tensor, weight: torch.Tensor, dilation: int = 1) -> torch.Tensor:
    span = dilation * (weight.shape[-1] - 1) + 1
    return F.conv2d(x, weight, padding=span // 2, dilation=dilation, groups=x.shape[1])


def grn(x: torch.Tensor, module) -> torch.Tensor:
    energy = x.pow(2).sum(dim=(2, 3), keepdim=True).sqrt()
    normed = energy / (energy.mean(dim=1, keepdim=True) + 1e-6)
    return module.gamma * (x * normed) + module.beta + x


def dilated_repconv(x: torch.Tensor, module) -> torch.Tensor:
    out = bn(depthwise(x, module.lk.weight), module.lk_bn)
    for branch in module.branches.values():
        out = out + bn(depthwise(x, branch.conv.weight, branch.conv.dilation[0]), branch.bn)
    return out


def clamped_windows(logits, rpb, value, k):
    """softmax(logits + bias) over each position's clamped KxK window, times the window's values.
    logits (B, h, H, W, K*K), value (B, h, c, H, W) -> (B, h, c, H, W)."""
    height, width = value.shape[-2:]
    out = torch.zeros_like(value)
    for i in range(height):
        for j in range(width):
            si, sj = min(max(i - k // 2, 0), height - k), min(max(j - k // 2, 0), width - k)
            bias = rpb[:, k - 1 + si - i : 2 * k - 1 + si - i, k - 1 + sj - j : 2 * k - 1 + sj - j].flatten(-2)
            probs = (logits[:, :, i, j] + bias).softmax(-1)  # (B, h, K*K)
            window = value[..., si : si + k, sj : sj + k].flatten(-2)  # (B, h, c, K*K)
            out[..., i, j] = (probs[:, :, None] * window).sum(-1)
    return out


def contmix_reference(cm, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Self-context ContMix: queries from x, keys from x's SxS region centres, values z."""
    batch, d, height, width = z.shape
    heads, k, big = cm.heads, cm.small_kernel_size, cm.kernel_size
    query = bn(conv1x1(x, cm.query.conv), cm.query.bn) * (d // heads) ** -0.5
    centres = F.adaptive_avg_pool2d(x, cm.key.pool.size)
    key = bn(conv1x1(centres, cm.key.conv), cm.key.bn)
    query = query.reshape(batch, heads, -1, height * width)
    key = key.reshape(batch, heads, -1, centres.shape[-2] * centres.shape[-1])
    affinity = torch.einsum("bgcn,bgcl->bgnl", query, key)
    weight = cm.kernel_proj.weight[:, :, 0, 0]  # (k*k + K*K, S*S), shared by the heads
    logits = torch.einsum("bgnl,ol->bgno", affinity, weight) + cm.kernel_proj.bias
    logits = logits.reshape(batch, heads, height, width, -1)
    value = z.reshape(batch, 2, heads, d // (2 * heads), height, width)
    small = clamped_windows(logits[..., : k * k], cm.rpb_small, value[:, 0], k)
    large = clamped_windows(logits[..., k * k :], cm.rpb_large, value[:, 1], big)
    return torch.stack([small, large], 1).reshape(batch, d, height, width)


def block_reference(m: ContMixBlock, x: torch.Tensor) -> torch.Tensor:
    z = x
    if m.fusion is not None:
        f = m.fusion
        z = grn(
            conv1x1(F.gelu(bn(depthwise(x, f.dwconv.weight) + f.dwconv.bias.view(1, -1, 1, 1), f.bn)), f.proj), f.grn
        )
    out = contmix_reference(m.contmix, z, x)
    if m.out_proj is not None:
        out = bn(conv1x1(out, m.out_proj.conv), m.out_proj.bn)
    if m.lepe is not None:
        out = out + bn(dilated_repconv(z, m.lepe.conv), m.lepe.bn)
    if m.gate is not None:
        out = F.silu(bn(conv1x1(z, m.gate.conv), m.gate.bn)) * out
    if m.proj is not None:
        out = conv1x1(bn(out, m.proj.bn), m.proj.conv)
    return out


# --- module tests -------------------------------------------------------------------------------

ALL = dict(fusion=True, gate=True, lepe=True, projections=True)
VARIANTS = {
    "all": ALL,
    "table7": {**ALL, "fusion": False},
    "bare": dict(fusion=False, gate=False, lepe=False, projections=False),
    "gate_only": dict(fusion=True, gate=True, lepe=False, projections=False),
}


def make_block(parts: dict[str, bool], deploy: bool = False) -> ContMixBlock:
    torch.manual_seed(0)
    block = ContMixBlock(8, 5, 3, 1, 3, **parts, deploy=deploy)
    with torch.no_grad():  # non-trivial GRN, biases and position biases (zeros at init)
        for parameter in block.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return block


@pytest.mark.parametrize("size", [(5, 7), (7, 5), (6, 6)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_contmix_block_matches_its_reference_forward_and_gradients(variant, size):
    block = make_block(VARIANTS[variant]).train()
    x = torch.randn(2, 8, *size, requires_grad=True)
    leaves = [x, *block.parameters()]
    out = block(x)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad, allow_unused=True)
    want_out = block_reference(block, x)
    want = torch.autograd.grad(want_out, leaves, grad, allow_unused=True)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-4)
    for index, (g, w) in enumerate(zip(got, want, strict=True)):
        assert (g is None) == (w is None), index
        if w is not None:  # float32 sums in other orders (oneDNN's and MKL's products): scaled rounding
            atol = 1e-5 * max(1.0, w.abs().max().item())
            torch.testing.assert_close(g, w, atol=atol, rtol=1e-4, msg=f"gradient {index}")


def test_contmix_block_parts_are_the_dynamic_blocks_and_absent_when_off():
    names = {name.split(".")[0] for name, _ in make_block(ALL).named_parameters()}
    assert names == {"fusion", "gate", "lepe", "contmix", "out_proj", "proj"}
    names = {name.split(".")[0] for name, _ in make_block(VARIANTS["bare"]).named_parameters()}
    assert names == {"contmix"}


@pytest.mark.parametrize("size", [(2, 3), (1, 1), (3, 9), (9, 4)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_contmix_block_runs_below_the_kernel_size(size):
    """Maps smaller than K take ContMix's resize path; gate and LePE stay at the input size."""
    block = make_block(ALL).train()
    x = torch.randn(2, 8, *size, requires_grad=True)
    out = block(x)
    out.square().mean().backward()
    assert out.shape == x.shape and torch.isfinite(x.grad).all()


def test_contmix_block_deploy_form_gives_the_same_outputs():
    block = make_block(ALL).eval()
    x = torch.randn(2, 8, 7, 6)
    want = block(x)
    for module in block.modules():
        if hasattr(module, "reparameterize"):
            module.reparameterize()
    deployed = ContMixBlock(8, 5, 3, 1, 3, **ALL, deploy=True).eval()
    deployed.load_state_dict(block.state_dict())  # the deploy layout is the folded one, key for key
    torch.testing.assert_close(block(x), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(deployed(x), want, atol=1e-5, rtol=1e-5)


def test_contmix_block_compiles_fullgraph_forward_and_backward():
    block = make_block(ALL).eval()
    x = torch.randn(2, 8, 7, 6, requires_grad=True)
    eager = block(x)
    eager.square().sum().backward()
    want = x.grad.clone()
    x.grad = None
    torch._dynamo.reset()
    out = torch.compile(block, fullgraph=True, backend="aot_eager")(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, want, atol=1e-4, rtol=1e-4)


def test_fvcore_counts_the_branch_and_the_dynamic_aggregation():
    d, big, small, s, h, w = 8, 5, 3, 3, 7, 6
    block = ContMixBlock(d, big, small, 1, s, **VARIANTS["table7"], deploy=True).eval()
    analysis = FlopCountAnalysis(block, torch.zeros(1, d, h, w))
    for name, handle in OVERLOCK_HANDLES.items():
        analysis.set_op_handle(name, handle)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        counts = dict(analysis.by_operator())
    assert counts["contmix"] == h * w * (small**2 + big**2) * d // 2  # each half: K*K taps per value channel
    pixels = h * w
    conv = pixels * (3 * d * d)  # out_proj, gate, proj
    conv += pixels * d * d // 2 + s * s * d * d // 2  # queries, keys (at the region centres)
    conv += pixels * 2 * s * s * (small**2 + big**2)  # the shared S*S -> logits conv, 2 heads
    conv += pixels * d * big * big  # the folded LePE
    assert counts["conv"] == conv


# --- the spec side ------------------------------------------------------------------------------


def test_table7_contmix_uses_the_block_branch_and_lands_near_the_paper():
    spec = archspec.load(CONTMIX_SPEC)
    mixer = spec.stages[0].block.mixer
    assert mixer.type == "contmix_block" and (mixer.gate, mixer.lepe, mixer.projections, mixer.fusion) == (
        True,
        True,
        True,
        False,
    )
    model = build(spec)
    assert sum(isinstance(m, ContMixBlock) for m in model.modules()) == 12


@pytest.mark.parametrize(
    ("overrides", "field", "text"),
    [
        (["stages.0.block.mixer.context=guided"], "stages[0].block.mixer.context", "self"),
        (["stages.0.kernel_size=21"], "stages[0].kernel_size", "no DilatedRepConv branch table"),
        (["stages.0.block.mixer.groups=3"], "stages[0].block.mixer.groups", "not divisible by 4 x groups = 12"),
        (["stages.0.block.mixer.gate=1"], "stages[0].block.mixer.gate", "boolean"),
    ],
)
def test_contmix_block_rules_name_the_field(overrides, field, text):
    with pytest.raises(SpecError) as info:
        archspec.load(CONTMIX_SPEC, overrides)
    assert field in str(info.value) and text in str(info.value), str(info.value)


def test_contmix_block_without_lepe_takes_any_odd_kernel():
    spec = archspec.load(CONTMIX_SPEC, ["stages.3.kernel_size=21", "stages.3.block.mixer.lepe=false"])
    assert spec.stages[3].kernel_size == 21
