"""The SNU network: SE Norm, the PET-only attention (PSAM) and its gating of the skips, shapes."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hnseg_export.onnx_export import export_onnx, proof_input, run_onnx
from hnseg_export.snu import PSAM, ConvSENorm, SENorm, SNUNet

pytestmark = pytest.mark.torch

TINY = {"base_features": 4, "depth": 3, "attention_features": 3, "blocks_per_level": 1}


def _randomised(module: torch.nn.Module, seed: int = 0, scale: float = 0.5) -> torch.nn.Module:
    """Non-default parameters, so that a check cannot pass by the initialisation's symmetry."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=generator))
    return module.eval()


def _volume(*shape, seed: int) -> torch.Tensor:
    """Channels with different offsets and scales, as features have."""
    generator = torch.Generator().manual_seed(seed)
    c = shape[1]
    offsets = torch.linspace(-3, 5, c).view(1, c, 1, 1, 1)
    scales = torch.linspace(0.2, 4, c).view(1, c, 1, 1, 1)
    return offsets + scales * torch.randn(shape, generator=generator)


# --------------------------------------------------------------------------------------------------------- SE Norm

def test_se_norm_output_is_each_channel_normalised_then_recalibrated():
    norm = _randomised(SENorm(6))
    x = _volume(2, 6, 6, 8, 10, seed=1)
    x[1] = x[1].flip(0) * 1.5  # another sample: other channel statistics
    with torch.no_grad():
        out = norm(x)
        gamma, beta = norm.recalibration(x)
    # Whatever the implementation, a channel of γ·x̂ + β has mean β and standard deviation γ (x̂ has mean 0, std 1).
    mean, std = out.mean(dim=(2, 3, 4)), out.std(dim=(2, 3, 4), unbiased=False)
    torch.testing.assert_close(mean, beta.flatten(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(std, gamma.flatten(1), atol=1e-4, rtol=1e-4)
    assert ((gamma > 0) & (gamma < 1)).all() and ((beta > -1) & (beta < 1)).all()
    # and the recalibration depends on the input (an SE block, not a fixed affine): samples get different γ, β
    assert (gamma[0] - gamma[1]).abs().max() > 1e-3 and (beta[0] - beta[1]).abs().max() > 1e-3


def test_se_norm_is_gamma_times_torch_instance_norm_plus_beta():
    norm = _randomised(SENorm(5), seed=9)
    x = torch.relu(_volume(2, 5, 8, 12, 10, seed=10))  # ReLU outputs, as SE Norm sees them in the network
    with torch.no_grad():
        gamma, beta = norm.recalibration(x)
        torch.testing.assert_close(norm(x), gamma * F.instance_norm(x, eps=1e-5) + beta)


def test_se_norm_exports_as_accurately_as_pytorch_runs(tmp_path):
    """onnxruntime's InstanceNormalization sums a channel in one float32 run: on ReLU outputs its x̂ is ~1e-4 off
    (measured 5e-4 for this block); SE Norm's axis-by-axis means keep the export within PyTorch's own error."""
    block = _randomised(ConvSENorm(2, 8), seed=11, scale=0.3)
    x = proof_input(2, (48, 64, 64), batch=1)
    path = export_onnx(block, tmp_path / "block.onnx", n_channels=2, patch_zyx=(48, 64, 64))
    with torch.no_grad():
        exact = block.double()(torch.from_numpy(x).double()).numpy()
    assert np.abs(run_onnx(path, x) - exact).max() < 2e-5


def test_se_norm_recalibration_is_iantsens_squeeze_excitation():
    """γ = sigmoid(W2·relu(W1·m + b1) + b2), β = tanh(...) with its own weights, m the channel means of x."""
    norm = _randomised(SENorm(8, reduction=2), seed=2)
    x = _volume(3, 8, 4, 6, 6, seed=3)
    m = x.mean(dim=(2, 3, 4))  # [N, C]

    def excite(se):
        w1, b1, w2, b2 = (p.detach() for p in (se[0].weight, se[0].bias, se[2].weight, se[2].bias))
        assert w1.shape[:2] == (4, 8)  # reduction 2
        return torch.relu(m @ w1.flatten(1).T + b1) @ w2.flatten(1).T + b2

    with torch.no_grad():
        gamma, beta = norm.recalibration(x)
    torch.testing.assert_close(gamma.flatten(1), torch.sigmoid(excite(norm.gamma)))
    torch.testing.assert_close(beta.flatten(1), torch.tanh(excite(norm.beta)))


# ------------------------------------------------------------------------------------------------------------ PSAM

def _attention_maps(net: SNUNet, x: torch.Tensor) -> list[torch.Tensor]:
    seen = []
    handle = net.psam.register_forward_hook(lambda module, inputs, output: seen.append(output))
    with torch.no_grad():
        net(x)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("pet_channel", [0, 1])
def test_psam_depends_on_the_pet_channel_only(pet_channel):
    net = _randomised(SNUNet(pet_channel=pet_channel, **TINY))
    other = 1 - pet_channel
    x = _volume(2, 2, 16, 16, 16, seed=4)
    changed_ct, changed_pet = x.clone(), x.clone()
    changed_ct[:, other] = _volume(2, 1, 16, 16, 16, seed=5)[:, 0]
    changed_pet[:, pet_channel] = _volume(2, 1, 16, 16, 16, seed=6)[:, 0]
    maps = _attention_maps(net, x)
    assert [m.shape for m in maps] == [(2, 1, 16, 16, 16), (2, 1, 8, 8, 8)]  # one map per skip resolution
    for before, after in zip(maps, _attention_maps(net, changed_ct)):
        assert torch.equal(before, after)
    for before, after in zip(maps, _attention_maps(net, changed_pet)):
        assert (before - after).abs().max() > 1e-3
    with torch.no_grad():  # the other channel still feeds the U-Net itself
        assert (net(x) - net(changed_ct)).abs().max() > 1e-3


def _decoder_skips(net: SNUNet, x: torch.Tensor):
    """(encoder outputs, attention maps, the skip halves the decoder stages received), by level."""
    encoder, decoder = {}, {}
    hooks = [stage.register_forward_hook(lambda m, i, o, level=level: encoder.__setitem__(level, o))
             for level, stage in enumerate(net.encoder)]
    hooks += [stage.blocks.register_forward_pre_hook(
        lambda m, i, level=level, up=stage.up.out_channels: decoder.__setitem__(level, i[0][:, up:]))
        for level, stage in enumerate(net.decoder)]
    maps = _attention_maps(net, x)
    for hook in hooks:
        hook.remove()
    return encoder, maps, decoder


def _set_attention(net: SNUNet, logit: float) -> None:
    with torch.no_grad():
        for head in net.psam.heads:
            head.weight.zero_()
            head.bias.fill_(logit)


def test_attention_multiplies_the_skip_features():
    net = _randomised(SNUNet(**TINY))
    x = _volume(1, 2, 16, 16, 16, seed=7)
    encoder, maps, decoder = _decoder_skips(net, x)
    assert len(decoder) == 2
    for level, skip in decoder.items():
        assert maps[level].min() < 0.9 * maps[level].max()  # a spatially varying map, so the check means something
        torch.testing.assert_close(skip, encoder[level] * maps[level])


def test_zero_attention_removes_the_skip_contribution():
    net = _randomised(SNUNet(**TINY))
    x = _volume(1, 2, 16, 16, 16, seed=8)
    _set_attention(net, -1e4)  # sigmoid → exactly 0
    encoder, maps, decoder = _decoder_skips(net, x)
    for level, skip in decoder.items():
        assert encoder[level].abs().max() > 0.1 and torch.count_nonzero(skip) == 0
    _set_attention(net, 1e4)  # sigmoid → exactly 1: the skips pass ungated
    encoder, maps, decoder = _decoder_skips(net, x)
    for level, skip in decoder.items():
        torch.testing.assert_close(skip, encoder[level])


def test_psam_takes_one_channel():
    psam = PSAM(3, features=2)
    maps = psam(torch.rand(1, 1, 16, 16, 16))
    assert [tuple(m.shape) for m in maps] == [(1, 1, 16, 16, 16), (1, 1, 8, 8, 8), (1, 1, 4, 4, 4)]
    assert all(((m > 0) & (m < 1)).all() for m in maps)
    with pytest.raises(RuntimeError):
        psam(torch.rand(1, 2, 16, 16, 16))


# ---------------------------------------------------------------------------------------------------------- shapes

def test_tiny_network_shapes():
    net = SNUNet(n_classes=4, **TINY).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 2, 16, 32, 24)).shape == (2, 4, 16, 32, 24)


def test_defaults_are_two_channels_in_three_classes_out():
    net = SNUNet().eval()  # depth 5, 24 features: the production network
    with torch.no_grad():
        # 32 slices: the deepest level (1/16) keeps 2 voxels for its instance norms
        assert net(torch.randn(1, 2, 32, 16, 16)).shape == (1, 3, 32, 16, 16)
    with pytest.raises(RuntimeError):  # 2 input channels, not 1
        net(torch.randn(1, 1, 32, 16, 16))


def test_112_slices_fit_depth_5_and_other_depths_are_refused():
    net = SNUNet(base_features=2, depth=5, attention_features=2, blocks_per_level=1).eval()
    with torch.no_grad():  # production is 112 × 256 × 256 (z, y, x); 112 = 7 · 2^4
        assert net(torch.randn(1, 2, 112, 32, 32)).shape == (1, 3, 112, 32, 32)
        with pytest.raises(ValueError, match="divisible by 16"):
            net(torch.randn(1, 2, 100, 32, 32))
    with pytest.raises(ValueError, match="divisible by 64"):
        SNUNet(base_features=2, depth=7, attention_features=2, blocks_per_level=1)(torch.randn(1, 2, 112, 64, 64))


def test_bad_constructor_arguments_are_refused():
    with pytest.raises(ValueError, match="pet_channel 2"):
        SNUNet(in_channels=2, pet_channel=2)
    with pytest.raises(ValueError, match="depth"):
        SNUNet(depth=1)
