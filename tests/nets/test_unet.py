"""The DDPM U-Net: shapes over every option, zero-initialised output, gradients, conditioning on
t and y, per-example independence, dropout, and validation."""
import pytest
import torch

from pdiff.nets.unet import UNet, unet_for

TINY = dict(base_channels=8, groups=4)


def tiny(in_channels=1, image_size=8, **kw) -> UNet:
    return UNet(in_channels, image_size, **{**TINY, **kw})


def perturb_(net: UNet, std: float = 0.2) -> UNet:
    """Move every parameter off its initial value, so no zero-initialised layer hides the rest."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(std * torch.randn_like(p))
    return net


def inputs(net: UNet, batch: int = 3):
    x = torch.randn(batch, net.in_channels, net.image_size, net.image_size)  # (B, C, H, W)
    t = torch.randint(0, 1000, (batch,))
    return x, t


@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("attention", [False, True])
@pytest.mark.parametrize("out_multiplier", [1, 2])
@pytest.mark.parametrize("channel_mults", [(1,), (1, 2)])
@pytest.mark.parametrize("image_size", [8, 16, 28])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_output_shape(in_channels, image_size, channel_mults, out_multiplier, attention,
                      conditional):
    lowest = image_size // 2 ** (len(channel_mults) - 1)
    net = tiny(in_channels, image_size, channel_mults=channel_mults, out_multiplier=out_multiplier,
               attention_resolutions=(lowest,) if attention else (),
               num_classes=3 if conditional else None)
    x, t = inputs(net, batch=2)
    y = torch.tensor([0, 3]) if conditional else None
    out = perturb_(net)(x, t, y)
    assert out.shape == (2, in_channels * out_multiplier, image_size, image_size)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("num_res_blocks", [1, 2])
def test_initial_output_is_exactly_zero(num_res_blocks):
    net = tiny(3, 16, num_res_blocks=num_res_blocks, attention_resolutions=(16, 8), out_multiplier=2,
               num_classes=2)
    x, t = inputs(net)
    assert torch.equal(net(x, t), torch.zeros(3, 6, 16, 16))


def test_zero_initialised_layers_still_learn():
    # With only the head perturbed the zero-initialised layers get non-zero gradients, so training
    # moves them off zero.
    net = tiny(num_classes=2)
    with torch.no_grad():
        net.out[-1].weight.normal_()
    x, t = inputs(net)
    (net(x, t, torch.tensor([0, 1, 2])) * torch.randn(3, 1, 8, 8)).sum().backward()
    zero_init = [m.weight for m in net.modules()
                 if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)) and m.bias is not None
                 and m.weight.abs().sum() == 0]
    assert zero_init and all(w.grad is not None and w.grad.abs().sum() > 0 for w in zero_init)
    assert all(p.grad is not None for p in net.parameters())


def test_gradients_reach_every_parameter():
    net = perturb_(tiny(num_classes=2, num_res_blocks=2, dropout=0.1))
    x, t = inputs(net)
    (net(x, t, torch.tensor([0, 1, 2])) * torch.randn(3, 1, 8, 8)).sum().backward()
    dead = [name for name, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, f"no gradient reaches {dead}"


def test_time_embedding_matters():
    net = perturb_(tiny()).eval()
    x, _ = inputs(net, batch=1)
    a, b = net(x, torch.tensor([1])), net(x, torch.tensor([500]))
    assert (a - b).abs().max() > 1e-4


def test_labels_matter_and_none_means_null():
    net = perturb_(tiny(num_classes=4)).eval()
    x, t = inputs(net, batch=2)
    assert (net(x, t, torch.tensor([0, 0])) - net(x, t, torch.tensor([1, 1]))).abs().max() > 1e-4
    assert net.null_label == 4
    assert torch.equal(net(x, t), net(x, t, torch.full((2,), net.null_label)))


def test_no_leakage_across_the_batch():
    net = perturb_(tiny(3, 8, num_classes=2, dropout=0.3)).eval()
    x, t = inputs(net, batch=2)
    y = torch.tensor([0, 2])
    together = net(x, t, y)
    alone = torch.cat([net(x[i:i + 1], t[i:i + 1], y[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(together, alone)


def test_dropout_only_in_train_mode():
    net = perturb_(tiny(dropout=0.5))
    x, t = inputs(net)
    assert not torch.equal(net(x, t), net(x, t))
    net.eval()
    assert torch.equal(net(x, t), net(x, t))
    plain = perturb_(tiny(dropout=0.0))
    assert torch.equal(plain(x, t), plain(x, t))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_any_float_dtype(dtype):
    net = perturb_(tiny(num_classes=2)).to(dtype)
    x, t = inputs(net)
    assert net(x.to(dtype), t).dtype == dtype


def test_scalar_t_is_broadcast():
    net = perturb_(tiny()).eval()
    x, _ = inputs(net)
    torch.testing.assert_close(net(x, torch.tensor(7)), net(x, torch.full((3,), 7)))


def test_several_batch_dimensions_are_flattened():
    """(N, T, C, H, W) with t (N, T) and one label per example gives each (x, t, y) its own
    prediction, as a flat batch would: the trajectory objective's shape."""
    net = perturb_(tiny(num_classes=3)).eval()
    x = torch.randn(2, 3, 1, 8, 8)
    t = torch.randint(0, 1000, (2, 3))
    y = torch.tensor([0, 2])
    got = net(x, t, y)
    assert got.shape == (2, 3, 1, 8, 8)
    flat = net(x.reshape(6, 1, 8, 8), t.reshape(6), y.repeat_interleave(3))
    torch.testing.assert_close(got, flat.reshape(2, 3, 1, 8, 8))
    torch.testing.assert_close(net(x, torch.tensor(5)), net(x, torch.full((2, 3), 5)))


@pytest.mark.parametrize("kwargs, match", [
    (dict(image_size=10, channel_mults=(1, 2, 2)), "divisible by 2\\*\\*"),
    (dict(groups=3), "valid groups: \\[1, 2, 4, 8\\]"),
    (dict(attention_resolutions=(2,)), "never occur.*\\[8, 4\\]"),
    (dict(num_heads=3), "num_heads"),
])
def test_bad_sizes_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**{"channel_mults": (1, 2), **kwargs})


def test_bad_inputs_raise():
    cond, uncond = tiny(num_classes=3), tiny()
    x, t = inputs(cond, batch=2)
    for y in (torch.tensor([0, 4]), torch.tensor([-1, 0])):
        with pytest.raises(ValueError, match="labels must lie in 0..2, or be the null label 3"):
            cond(x, t, y)
    with pytest.raises(ValueError, match="unconditional"):
        uncond(x, t, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="unconditional"):
        uncond.null_label
    with pytest.raises(ValueError, match="shape \\(B, 1, H, W\\)"):
        uncond(torch.randn(2, 3, 8, 8), t)


@pytest.mark.parametrize("size, mults, attention", [
    (8, (1, 2), (4,)), (28, (1, 2, 2), (7,)), (32, (1, 2, 2), (8,)), (64, (1, 2, 2, 2), (8,)),
])
def test_unet_for_gives_a_valid_net(size, mults, attention):
    kwargs = unet_for(size, 3)
    assert (kwargs["channel_mults"], kwargs["attention_resolutions"]) == (mults, attention)
    assert kwargs["base_channels"] == (32 if size <= 32 else 64)
    net = UNet(**kwargs).float()
    with torch.no_grad():
        out = net(torch.randn(1, 3, size, size, dtype=torch.float32), torch.tensor([5]))
    assert out.shape == (1, 3, size, size)


def test_unet_for_overrides():
    assert unet_for(28, 1, out_multiplier=2, num_classes=10)["out_multiplier"] == 2
    with pytest.raises(ValueError, match="unknown UNet arguments \\['widht'\\]; valid:"):
        unet_for(28, 1, widht=3)
