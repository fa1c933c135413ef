import pytest
import torch
from segmentation_models_pytorch.losses import FocalLoss

from smptrain.core.errors import UserError
from smptrain.data.augment import AUGMENTATIONS, augment, augment_generator
from smptrain.model.losses import focal_loss
from smptrain.model.network import build_model, check_patch_size


@pytest.mark.parametrize("alpha", [None, 0.25])
def test_focal_loss_equals_smp_on_logits(alpha):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 16, 16, generator=g)
    y = torch.randint(0, 3, (3, 16, 16), generator=g).to(torch.uint8)
    ours, sums, counts = focal_loss(logits, y, alpha, 2.0)
    reference = FocalLoss(mode="binary", alpha=alpha, gamma=2.0, ignore_index=2)(logits.squeeze(1), y.long())
    assert ours.item() == pytest.approx(reference.item(), rel=1e-6)
    assert counts.tolist() == (y != 2).flatten(1).sum(1).tolist()


def test_fully_ignored_batch_gives_zero_loss_and_zero_gradients():
    logits = torch.randn(2, 1, 8, 8, requires_grad=True)
    loss, _, _ = focal_loss(logits, torch.full((2, 8, 8), 2, dtype=torch.uint8), None, 2.0)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() == 0


def test_model_returns_logits_and_checks_patch_size():
    model = build_model("Unet", "resnet18", 5)
    out = model(torch.rand(2, 5, 64, 64))
    assert out.shape == (2, 1, 64, 64) and (out < 0).any()  # raw logits, no activation
    check_patch_size(model, "Unet", 64)
    with pytest.raises(UserError, match="not divisible by 32"):
        check_patch_size(model, "Unet", 100)
    # "imagenet" is now weights by name (tests/test_pretrained.py); a path that is not there, or an unknown name:
    with pytest.raises(UserError, match="no such file"):
        build_model("Unet", "resnet18", 5, "weights/missing.safetensors")
    with pytest.raises(UserError, match=r"nor weights smp has for resnet18 \(imagenet, ssl, swsl\)"):
        build_model("Unet", "resnet18", 5, "imagenet21k")
    with pytest.raises(UserError, match="'no-such-encoder' is not an encoder smp or timm knows"):
        build_model("Unet", "no-such-encoder", 5)
    with pytest.raises(UserError, match="cannot be built"):
        build_model("NoSuchArch", "resnet18", 5)


def test_local_encoder_weights_are_loaded_and_adapted(tmp_path):
    import segmentation_models_pytorch as smp
    from safetensors.torch import save_file

    encoder = smp.encoders.get_encoder("resnet18", in_channels=3, weights=None)
    save_file(encoder.state_dict(), str(tmp_path / "resnet18.safetensors"))
    model = build_model("Unet", "resnet18", 7, str(tmp_path / "resnet18.safetensors"))
    assert torch.equal(model.encoder.layer1[0].conv1.weight, encoder.layer1[0].conv1.weight)
    assert model.encoder.conv1.weight.shape[1] == 7


def test_geometric_augmentations_move_image_and_mask_together():
    x = torch.rand(16, 3, 32, 32)
    y = (x[:, 0] > 0.5).to(torch.uint8)  # the mask is a function of the image, so it must stay aligned
    for name in ("HorizontalFlip", "VerticalFlip", "RandomRotate90", "D4"):
        ax, ay = augment(x, y, [name], augment_generator(x.device, 1, 0, 0, 0))
        assert torch.equal(ay, (ax[:, 0] > 0.5).to(torch.uint8)), name
        assert not torch.equal(ax, x) or name != "D4"


def test_augmentations_are_reproducible_and_stay_in_range():
    x = torch.rand(8, 4, 32, 32)
    y = torch.randint(0, 3, (8, 32, 32), dtype=torch.uint8)
    names = list(AUGMENTATIONS)
    a = augment(x, y, names, augment_generator(x.device, 5, 2, 7, 0))
    b = augment(x, y, names, augment_generator(x.device, 5, 2, 7, 0))
    c = augment(x, y, names, augment_generator(x.device, 5, 2, 8, 0))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    assert a[0].min() >= 0 and a[0].max() <= 1 and set(a[1].unique().tolist()) <= {0, 1, 2}
