"""Whole models after fastlayers.accelerate / sparsify under torch.compile(fullgraph=True): forward and backward
equal eager (tiny configurations; the Triton kernels run in the interpreter on CPU)."""
import copy

import pytest
import torch
from torch import nn

import fastlayers

from .conftest import ON_GPU

DEV = torch.device("cuda" if ON_GPU else "cpu")


def _tiny_vit():
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10), \
        (torch.randn(2, 3, 32, 32),)


def _tiny_halonet():
    from timm.layers.halo_attn import HaloAttn
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), HaloAttn(16, num_heads=2, block_size=4, halo_size=1),
                          nn.BatchNorm2d(16), nn.ReLU(), HaloAttn(16, 32, stride=2, num_heads=2, block_size=4,
                                                                   halo_size=2))
    return model, (torch.randn(2, 3, 8, 8),)


def _mamba_stack():
    from fastlayers.nn import Mamba
    return nn.Sequential(Mamba(16, d_state=8, layer_idx=0), Mamba(16, d_state=8, layer_idx=1)), \
        (torch.randn(2, 11, 16),)


def _accelerated(make):
    def build():
        model, args = make()
        fastlayers.accelerate(model)
        return model, args
    return build


def _spark_resnet():
    from timm.models.resnet import BasicBlock, ResNet
    model = ResNet(BasicBlock, [1, 1, 1, 1], channels=(8, 16, 16, 24), stem_width=8, num_classes=5)
    fastlayers.sparsify(model)
    mask = torch.tensor([[[[True, False], [True, True]]], [[[False, True], [True, False]]]])

    class Encoder(nn.Module):  # SparK sets the mask once per forward
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x, mask):
            with fastlayers.nn.sparse_mask(mask):
                return self.model.forward_features(x)
    return Encoder(), (torch.randn(2, 3, 64, 64), mask)


MODELS = {"vit": _accelerated(_tiny_vit), "halonet": _accelerated(_tiny_halonet), "mamba": _mamba_stack,
          "spark-resnet": _spark_resnet}
# the images of the SparK encoder need no gradient (and its 7x7 stem's dx is the slowest kernel to interpret)
GRAD_INPUT = {"vit": True, "halonet": True, "mamba": True, "spark-resnet": False}


@pytest.mark.parametrize("name", list(MODELS))
def test_compiled_model_equals_eager(name):
    torch.manual_seed(0)
    model, args = MODELS[name]()
    model = model.to(DEV).train()
    args = [a.to(DEV) for a in args]
    compiled_model = copy.deepcopy(model)
    x = [args[0].requires_grad_()] if GRAD_INPUT[name] else []
    with fastlayers.use_backend("triton"):
        eager = model(*args)
        g_eager = torch.autograd.grad(eager.sum(), [*x, *model.parameters()], allow_unused=True)
        compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
        out = compiled(*args)
        g = torch.autograd.grad(out.sum(), [*x, *compiled_model.parameters()], allow_unused=True)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    for a, b in zip(g, g_eager):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_accelerate_reports_what_it_replaced():
    model, _ = _tiny_vit()
    report = fastlayers.accelerate(model)
    assert len(report.replaced) == 2 and all(r[2] == "Attention" for r in report.replaced)
    assert "replaced 2 module(s)" in str(report)
    again = fastlayers.accelerate(model)  # idempotent: the twins are not replaced again
    assert not again.replaced
