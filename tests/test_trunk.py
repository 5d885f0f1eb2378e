import pytest
import torch

from mtssl.models.multitask import MultiTaskNet
from mtssl.models.resnet_v2 import ResNetV2Trunk


@pytest.mark.parametrize("stride", [8, 16])
def test_taps_shapes_and_strides(stride):
    trunk = ResNetV2Trunk(depth=26, width=0.125, output_stride=stride)
    out = trunk(torch.randn(2, 3, 96, 128))
    assert list(out.taps) == ["block3/unit_1", "block3/unit_2"]
    for tap in out.taps.values():
        assert tap.shape == (2, 128, 96 // stride, 128 // stride)
    assert out.out is out.taps["block3/unit_2"]


def test_output_stride_changes_dilation_not_parameters():
    a = ResNetV2Trunk(depth=26, width=0.125, output_stride=8)
    b = ResNetV2Trunk(depth=26, width=0.125, output_stride=16)
    b.load_state_dict(a.state_dict())  # same parameters, only strides become dilations
    dilations = [m.dilation for m in a.block3.modules() if isinstance(m, torch.nn.Conv2d)
                 and m.kernel_size == (3, 3)]
    assert set(dilations) == {(2, 2)}


def test_depths_and_paper_size():
    with torch.device("meta"):
        for depth, n in [(26, 2), (50, 6), (101, 23), (152, 36)]:
            assert len(ResNetV2Trunk(depth=depth).tap_names) == n
        paper = ResNetV2Trunk(depth=101)
    assert paper.out_channels == 1024
    millions = sum(p.numel() for p in paper.parameters()) / 1e6
    assert 25 < millions < 32  # "about 30M" through block 3


def test_width_scales_channels():
    assert ResNetV2Trunk(depth=26, width=0.25).out_channels == 256
    assert ResNetV2Trunk(depth=26, width=0.25, norm="group").out_channels == 256


def fake_batches(n=4):
    g = torch.Generator().manual_seed(0)
    return {
        "relative_position": {"patches": torch.randn(n, 2, 3, 16, 16, generator=g),
                              "label": torch.arange(n) % 8},
        "colorization": {"image": torch.randn(n, 3, 32, 32, generator=g),
                         "ab": 40 * torch.randn(n, 2, 32, 32, generator=g)},
        "exemplar": {"views": torch.randn(n, 2, 3, 16, 16, generator=g)},
        "motion_segmentation": {"frame": torch.randn(n, 3, 32, 48, generator=g),
                                "mask": (torch.rand(n, 1, 32, 48, generator=g) > 0.5).float()},
    }


def test_every_parameter_gets_a_gradient(tiny_config):
    model = MultiTaskNet.from_config(tiny_config())
    batches = fake_batches()
    loss = sum(model(t, batches[t]).loss + model.mix[t].penalty() for t in model.tasks)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_naive_mode_has_no_alpha_and_reads_last_unit(tiny_config):
    model = MultiTaskNet.from_config(tiny_config("lasso.mode=naive"))
    assert not [n for n, _ in model.named_parameters() if n.startswith("mix.")]
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    assert torch.equal(model.features("colorization", x), model.trunk(x).out)
    assert model.alpha_matrix().shape == (4, 2)


def test_channels_last_trunk_gives_the_same_features_and_gradients():
    """trunk.channels_last changes the memory layout only (numbers equal up to rounding)."""
    from mtssl.models.resnet_v2 import ResNetV2Trunk
    torch.manual_seed(0)
    plain = ResNetV2Trunk(units=(1, 1, 2), width=0.0625, output_stride=8)
    nhwc = ResNetV2Trunk(units=(1, 1, 2), width=0.0625, output_stride=8, channels_last=True)
    nhwc.load_state_dict(plain.state_dict())
    assert nhwc.root[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 40, 48)
    a, b = plain(x).out, nhwc(x).out
    assert b.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(a, b, atol=1e-5)
    a.sum().backward()
    b.sum().backward()
    g = plain.root[0].weight.grad
    torch.testing.assert_close(nhwc.root[0].weight.grad, g, rtol=1e-4,
                               atol=1e-5 * float(g.abs().max()))


def test_compiled_trunk_keeps_parameter_names_and_outputs(tiny_config):
    """trunk.compile compiles the trunk in place: checkpoints, optimizer owners and the
    distributed layout keep their names, and the features are the same."""
    from mtssl.models.multitask import build_trunk
    torch.manual_seed(0)
    plain = build_trunk(tiny_config())
    compiled = build_trunk(tiny_config("trunk.compile=true"))
    assert list(compiled.state_dict()) == list(plain.state_dict())
    compiled.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(compiled(x).out, plain(x).out, rtol=1e-4, atol=1e-4)
