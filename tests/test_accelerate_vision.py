"""fastllm.accelerate on timm VisionTransformer and open_clip CLIP models (random weights, pretrained=False).

Both libraries import torchvision. PyPI's torchvision for Linux x86-64 is a CUDA build whose compiled ops do not load
beside the CPU torch; tests/conftest.py imports it without them (fastllm.testing.import_torchvision), so these are
the real timm / open_clip / torchvision packages, their Vision Transformers untouched (they never call torchvision's
detection ops). The libraries come from the `vision` extra (pip install -e ".[vision]"); without it these tests
skip, except under FASTLLM_REQUIRE_VISION=1 (.ci/run sets it), where a missing library is a failure.

Criterion (fastllm.testing): the unpatched model in float64 is the reference, the unpatched model in the same dtype
the eager baseline. Norms and biases are perturbed (the libraries initialize them to 1 / 0), sizes odd.
"""

import copy
import importlib
import os

import pytest
import torch
from torch import nn

import fastllm
from fastllm.integrations import vision
from fastllm.testing import assert_equivalent

REQUIRE = os.environ.get("FASTLLM_REQUIRE_VISION") == "1"


def _lib(name):
    try:
        return importlib.import_module(name)
    except ImportError:
        if REQUIRE:
            raise
        pytest.skip(f"{name} is not installed (pip install -e '.[vision]'; FASTLLM_REQUIRE_VISION=1 fails instead)")


@pytest.fixture(scope="module")
def timm():
    return _lib("timm")


@pytest.fixture(scope="module")
def open_clip():
    return _lib("open_clip")


def _perturb(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name or name.endswith("bias") or "gamma" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _replaced(model) -> dict:
    out: dict = {}
    for _, cls, _rule in model.fastllm_report.replaced:
        out[cls] = out.get(cls, 0) + 1
    return out


class _Calls:
    """Counts the fastllm op calls made through fastllm/integrations/vision.py (the fast path really ran)."""

    def __init__(self, monkeypatch):
        self.n: dict = {}
        for name in ("qkv_projection", "attention_merged", "scaled_dot_product_attention", "linear", "fused_ffn"):
            fn = getattr(vision, name)
            monkeypatch.setattr(vision, name, self._wrap(name, fn))

    def _wrap(self, name, fn):
        def counted(*a, **k):
            self.n[name] = self.n.get(name, 0) + 1
            return fn(*a, **k)

        return counted


# ==================================================================================================
# timm


def _vit(timm, **kw):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    args = dict(img_size=20, patch_size=4, embed_dim=48, depth=2, num_heads=6, mlp_ratio=1.85, num_classes=7,
                qkv_bias=True)  # fmt: skip
    args.update(kw)
    return _perturb(VisionTransformer(**args).eval())


VIT_VARIANTS = {
    "plain": {},
    "layer_scale": {"init_values": 0.3},
    "no_qkv_bias_reg_tokens": {"qkv_bias": False, "reg_tokens": 3, "class_token": False, "global_pool": "avg"},
    "quick_gelu": {"act_layer": "quick_gelu"},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", list(VIT_VARIANTS))
def test_timm_vit_criterion(timm, variant, dtype, monkeypatch):
    """The logits and the token features of a timm VisionTransformer: blocks, attention, MLP and norms replaced,
    the fast path taken (ops counted), within the criterion for fp32 and bf16."""
    model = _vit(timm, **VIT_VARIANTS[variant])
    ref, eager = copy.deepcopy(model).double(), copy.deepcopy(model).to(dtype)
    ours = fastllm.accelerate(copy.deepcopy(model).to(dtype))
    rep = _replaced(ours)
    assert rep.get("Block") == 2 and rep.get("Attention") == 2 and rep.get("Mlp") == 2, ours.fastllm_report
    assert rep.get("LayerNorm", 0) >= 4 and not ours.fastllm_report.kept, ours.fastllm_report
    assert "timm" in ours.fastllm_report.versions
    calls = _Calls(monkeypatch)
    x = torch.randn(3, 3, 20, 20, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        out, e, r = (m.forward_features(x.to(dt)) for m, dt in ((ours, dtype), (eager, dtype), (ref, torch.float64)))
        logits, le, lr = (m(x.to(dt)) for m, dt in ((ours, dtype), (eager, dtype), (ref, torch.float64)))
    assert calls.n.get("qkv_projection", 0) >= 4 and calls.n.get("attention_merged", 0) >= 4, calls.n
    if variant == "layer_scale":  # (the scale sits between fc2 and the add: the MLP is one fused_ffn)
        assert calls.n.get("linear", 0) >= 4 and calls.n.get("fused_ffn", 0) >= 4, calls.n
    else:  # proj, fc1 and fc2 with the residual adds in proj's and fc2's epilogues
        assert calls.n.get("linear", 0) >= 12, calls.n
    assert_equivalent(out, e, r, f"timm vit {variant} {dtype} features")
    assert_equivalent(logits, le, lr, f"timm vit {variant} {dtype} logits")


def test_timm_attention_masks_and_causal(timm):
    """timm's Attention called with a bool mask, a float mask and is_causal (its forward takes them; SDPA rules)."""
    from timm.layers import Attention

    torch.manual_seed(0)
    attn = _perturb(Attention(48, num_heads=6, qkv_bias=True).eval())
    ours, ref = fastllm.accelerate(copy.deepcopy(attn)), copy.deepcopy(attn).double()
    x = torch.randn(3, 11, 48)
    keep = torch.ones(3, 1, 1, 11, dtype=torch.bool)
    keep[1, ..., 6:], keep[2, ..., 2:] = False, False
    for name, kw in (("bool", {"attn_mask": keep}), ("float", {"attn_mask": torch.randn(3, 6, 11, 11)}),
                     ("causal", {"is_causal": True})):  # fmt: skip
        kw64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kw.items()}
        with torch.no_grad():
            out, e, r = ours(x, **kw), attn(x, **kw), ref(x.double(), **kw64)
        assert_equivalent(out, e, r, f"timm attention {name} mask")


def test_timm_gradients_and_optimizer_step(timm):
    """Training mode (drop rates 0): gradients of the input and of every parameter meet the criterion; after an
    optimizer step the next forward reads the new weights."""
    model = _vit(timm, init_values=0.5).train()
    ours, ref = fastllm.accelerate(copy.deepcopy(model)), copy.deepcopy(model).double()
    x = torch.randn(2, 3, 20, 20, generator=torch.Generator().manual_seed(3))
    grads = []
    for m, dt in ((ours, torch.float32), (model, torch.float32), (ref, torch.float64)):
        xi = x.to(dt).detach().clone().requires_grad_()
        m.zero_grad()
        m(xi).square().sum().backward()
        grads.append([("x", xi.grad)] + [(n, p.grad) for n, p in m.named_parameters()])
    for (name, g), (_, ge), (_, gr) in zip(*grads, strict=True):
        assert g is not None, name
        assert_equivalent(g, ge, gr, f"timm grad {name}")
    torch.optim.SGD(ours.parameters(), lr=0.5).step()
    stepped = fastllm.restore(copy.deepcopy(ours)).double().eval()
    ours.eval()
    with torch.no_grad():
        out, r = ours(x), stepped(x.double())
        e = fastllm.restore(copy.deepcopy(ours)).eval()(x)
    assert_equivalent(out, e, r, "timm after an optimizer step")


def test_timm_dropout_and_drop_path_in_training_run_the_original(timm):
    """attn / proj / MLP dropout and drop path active in training: the blocks, attentions and MLPs run their original
    forwards (the same random draws: bit-identical under the same seed, with the norms left to torch: norm=False);
    in eval the fast path runs again."""
    model = _vit(timm, attn_drop_rate=0.2, proj_drop_rate=0.2, drop_path_rate=0.3).train()
    ours = fastllm.accelerate(copy.deepcopy(model), norm=False)
    assert _replaced(ours).get("Block") == 2 and _replaced(ours).get("Attention") == 2
    x = torch.randn(2, 3, 20, 20)
    torch.manual_seed(7)
    out = ours(x)
    torch.manual_seed(7)
    want = model(x)
    assert torch.equal(out, want)
    ours.eval(), model.eval()
    with torch.no_grad():
        out, e, r = ours(x), model(x), copy.deepcopy(model).double()(x.double())
    assert not torch.equal(out, e)  # (the fast path: fastllm's kernels round differently from torch's)
    assert_equivalent(out, e, r, "timm eval after training-mode calls")


def test_timm_declines_with_reasons(timm):
    """qk_norm (a LayerNorm on q and k) and a non-Identity norm inside Mlp: kept and reported, the model's output
    unchanged (the rest still accelerated)."""
    model = _vit(timm, qk_norm=True)
    model.blocks[0].mlp.norm = nn.LayerNorm(model.blocks[0].mlp.fc1.out_features)
    ours = fastllm.accelerate(copy.deepcopy(model))
    kept = {(n, r) for n, _, r in ours.fastllm_report.kept}
    assert any(n == "blocks.0.attn" and "q_norm" in r for n, r in kept), kept
    assert any(n == "blocks.0.mlp" and "norm" in r for n, r in kept), kept
    assert "blocks.1.mlp" in {n for n, _, _ in ours.fastllm_report.replaced}
    x = torch.randn(2, 3, 20, 20)
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        assert_equivalent(ours(x), model(x), ref(x.double()), "timm with declined modules")


def test_timm_restore_and_state_dict(timm):
    """State-dict keys and tensors unchanged; restore gives back the original classes and bit-identical outputs;
    accelerating twice changes nothing."""
    model = _vit(timm)
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    ours = fastllm.accelerate(model)
    assert all(torch.equal(keys[k], v) for k, v in ours.state_dict().items()) and set(keys) == set(ours.state_dict())
    again = fastllm.accelerate(ours).fastllm_report
    assert not again.replaced and again.already
    fastllm.restore(ours)
    assert [type(m) for m in ours.modules()] == classes


# ==================================================================================================
# open_clip


def _clip(open_clip, quick_gelu=False, ls=None):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    vcfg = CLIPVisionCfg(layers=2, width=48, head_width=8, image_size=20, patch_size=5, mlp_ratio=1.85,
                         ls_init_value=ls)  # fmt: skip
    tcfg = CLIPTextCfg(context_length=13, vocab_size=97, width=40, heads=5, layers=2, ls_init_value=ls)
    return _perturb(CLIP(embed_dim=24, vision_cfg=vcfg, text_cfg=tcfg, quick_gelu=quick_gelu).eval())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["gelu", "quick_gelu", "layer_scale"])
def test_open_clip_criterion(open_clip, variant, dtype, monkeypatch):
    """encode_image and encode_text (causal float mask, argmax pooling) of an open_clip CLIP: the residual blocks of
    both towers, their nn.MultiheadAttention and LayerNorms replaced and the fast path taken."""
    model = _clip(open_clip, quick_gelu=variant == "quick_gelu", ls=0.3 if variant == "layer_scale" else None)
    ref, eager = copy.deepcopy(model).double(), copy.deepcopy(model).to(dtype)
    ours = fastllm.accelerate(copy.deepcopy(model).to(dtype))
    rep = _replaced(ours)
    assert rep.get("ResidualAttentionBlock") == 4 and rep.get("MultiheadAttention") == 4, ours.fastllm_report
    assert rep.get("LayerNorm", 0) >= 8 and "open_clip" in ours.fastllm_report.versions, ours.fastllm_report
    calls = _Calls(monkeypatch)
    pixels = torch.randn(3, 3, 20, 20, generator=torch.Generator().manual_seed(2))
    text = torch.randint(3, 97, (3, 13), generator=torch.Generator().manual_seed(4))
    text[0, 9:], text[1, 4:] = 0, 0  # (padding after the highest id, where argmax pooling reads)
    with torch.inference_mode():
        img = [m.encode_image(pixels.to(dt)) for m, dt in ((ours, dtype), (eager, dtype), (ref, torch.float64))]
        txt = [m.encode_text(text) for m in (ours, eager, ref)]
    if variant == "layer_scale":  # (the scale sits between the GEMM and the add: one fused_ffn per MLP)
        assert calls.n.get("fused_ffn", 0) >= 4, calls.n
    else:  # the MLPs' two GEMMs per block (the add in c_proj's epilogue)
        assert calls.n.get("linear", 0) >= 8, calls.n
    assert_equivalent(*img, f"open_clip {variant} {dtype} image")
    assert_equivalent(*txt, f"open_clip {variant} {dtype} text")


def test_open_clip_gradients(open_clip):
    """Gradients of every parameter through both towers (contrastive logits) meet the criterion."""
    model = _clip(open_clip).train()
    ours, ref = fastllm.accelerate(copy.deepcopy(model)), copy.deepcopy(model).double()
    pixels = torch.randn(3, 3, 20, 20, generator=torch.Generator().manual_seed(2))
    text = torch.randint(3, 97, (3, 13), generator=torch.Generator().manual_seed(4))
    grads = []
    for m, dt in ((ours, torch.float32), (model, torch.float32), (ref, torch.float64)):
        m.zero_grad()
        img, txt, scale = m(pixels.to(dt), text)
        (scale * img @ txt.T).logsumexp(-1).sum().backward()
        grads.append([(n, p.grad) for n, p in m.named_parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 20
    for (name, g), (_, ge), (_, gr) in zip(*grads, strict=True):
        assert_equivalent(g, ge, gr, f"open_clip grad {name}")


def test_open_clip_fp32_layer_norm_and_restore(open_clip):
    """LayerNormFp32 (open_clip's class for 16-bit towers) takes float32 inputs on fastllm.layer_norm and a bf16
    input through its own forward; restore gives back every original class."""
    from open_clip.transformer import LayerNormFp32

    torch.manual_seed(0)
    ln = _perturb(LayerNormFp32(40).eval())
    classes = [type(m) for m in ln.modules()]
    ours = fastllm.accelerate(copy.deepcopy(ln))
    assert ours.fastllm_report.replaced and type(ours) is not LayerNormFp32
    x = torch.randn(4, 40)
    with torch.no_grad():
        r = nn.functional.layer_norm(x.double(), (40,), ln.weight.double(), ln.bias.double(), ln.eps)  # (its own
        assert_equivalent(ours(x), ln(x), r, "LayerNormFp32")  # forward casts to float32: not a float64 reference)
        assert torch.equal(ours(x.bfloat16()), ln(x.bfloat16()))  # (the original: fp32 math, cast back)
    assert [type(m) for m in fastllm.restore(ours).modules()] == classes


def test_torchvision_state():
    """The conftest's torchvision import: absent, normal, or (PyPI's CUDA wheel beside a CPU torch) without its
    compiled ops; with it transformers still imports its models."""
    import conftest

    assert conftest.TORCHVISION in ("absent", "ok", "without compiled ops")
    if REQUIRE:
        assert conftest.TORCHVISION != "absent"
    if conftest.TORCHVISION != "absent":
        import torchvision.transforms  # noqa: F401


# ==================================================================================================
# Hooks below a fused module


def _hook_outputs(model, path: str, run):
    """Outputs seen by a forward hook on model.<path> during run(model), and run's result."""
    seen = []
    handle = model.get_submodule(path).register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    try:
        with torch.no_grad():
            out = run(model)
    finally:
        handle.remove()
    return seen, out


def test_hooks_below_fused_blocks_run(timm, open_clip):
    """A forward hook on a module that a fused block would compute itself (timm's Block -> attn.qkv and mlp.fc1,
    open_clip's block -> mlp.c_fc, a torch.nn encoder layer -> linear1) runs, as often and with the same values as
    without accelerate: the block takes its original forward while the hook is there (engine.hooks_below), and
    the fast path again once it is removed."""
    vit, clip = _vit(timm), _clip(open_clip)
    layer = nn.TransformerEncoderLayer(16, 2, 24, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    px = torch.randn(2, 3, 20, 20, generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2))
    cases = [(vit, "blocks.0.attn.qkv", lambda m: m(px)), (vit, "blocks.1.mlp.fc1", lambda m: m(px)),
             (clip, "visual.transformer.resblocks.0.mlp.c_fc", lambda m: m.encode_image(px)),
             (enc, "layers.1.linear1", lambda m: m(x))]  # fmt: skip
    for model, path, run in cases:
        ours = fastllm.accelerate(copy.deepcopy(model))
        want, out_want = _hook_outputs(model, path, run)
        got, out = _hook_outputs(ours, path, run)
        assert len(got) == len(want) == 1, (path, len(got), len(want))
        torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)  # (fp32; the criterion: the tests above)
        torch.testing.assert_close(out, out_want, rtol=1e-4, atol=1e-4)
        fastllm.accelerate(ours)  # (idempotent) and without the hook: the fused path computes the same
        with torch.no_grad():
            torch.testing.assert_close(run(ours), out_want, rtol=1e-4, atol=1e-4)
