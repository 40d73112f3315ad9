"""Class labels and classifier-free guidance around a conditional U-Net."""
import pytest
import torch

from pdiff.nets import GuidedNet, LabelledNet, UNet, unet_for


def conditional_unet(out_multiplier=1, num_classes=3):
    torch.manual_seed(0)
    net = UNet(**unet_for(8, 1, base_channels=8, out_multiplier=out_multiplier, num_classes=num_classes))
    with torch.no_grad():  # the output layer starts at zero (as in DDPM): make every output non-trivial
        for p in net.parameters():
            p.normal_(0, 0.3)
    return net.eval()


@pytest.mark.parametrize("out_multiplier", [1, 2])
def test_guidance_zero_is_the_conditional_net(out_multiplier):
    net = conditional_unet(out_multiplier)
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([1, 5, 9, 20]), torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        assert torch.equal(GuidedNet(net, y, 0.0, net.null_label)(x, t), net(x, t, y))


@pytest.mark.parametrize("out_multiplier", [1, 2])
@pytest.mark.parametrize("w", [0.5, 3.0])
def test_guidance_extrapolates_the_mean_channels_and_keeps_the_conditional_variance(out_multiplier, w):
    """(1 + w) f(x, t, y) - w f(x, t, null) on the mean channels; the variance channels are f(x, t, y)."""
    net = conditional_unet(out_multiplier)
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([1, 5, 9, 20]), torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        got = GuidedNet(net, y, w, net.null_label)(x, t)
        cond, uncond = net(x, t, y), net(x, t, torch.full_like(y, net.null_label))
    assert got.shape == cond.shape and not torch.allclose(cond, uncond)
    torch.testing.assert_close(got[:, :1], (1 + w) * cond[:, :1] - w * uncond[:, :1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[:, 1:], cond[:, 1:], rtol=1e-5, atol=1e-5)


def test_one_label_for_the_whole_batch_and_bad_labels():
    net = conditional_unet()
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([2, 3, 4])
    with torch.no_grad():
        assert torch.equal(GuidedNet(net, torch.tensor(2), 0.0, net.null_label)(x, t),
                           net(x, t, torch.tensor([2, 2, 2])))
    with pytest.raises(ValueError, match="2 labels for a batch of 3"):
        GuidedNet(net, torch.tensor([0, 1]), 1.0, net.null_label)(x, t)
    with pytest.raises(ValueError, match=">= 0"):
        GuidedNet(net, torch.tensor(0), -1.0, net.null_label)


def test_labelled_net_passes_its_labels_and_defaults_to_the_null_label():
    net = conditional_unet()
    wrapped = LabelledNet(net)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 7]), torch.tensor([1, 0])
    with torch.no_grad():
        null = torch.full_like(y, net.null_label)
        assert torch.equal(wrapped(x, t), net(x, t, null))
        wrapped.labels = y
        assert torch.equal(wrapped(x, t), net(x, t, y))
        assert not torch.equal(wrapped(x, t), net(x, t, null))  # the label matters
        wrapped.labels = y[:1]
        with pytest.raises(ValueError, match="1 labels for a batch of 2"):
            wrapped(x, t)
