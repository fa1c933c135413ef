"""The network. The model knows nothing about training; it returns logits (N, 1, H, W).

DARTS builds the model with `activation="sigmoid"` and feeds its probabilities to a focal loss that expects logits
(a double sigmoid, darts-contract §4). smptrain builds it without an activation and trains on logits; inference
(ours and DARTS' `SMPSegmenter`) applies one sigmoid. The weights are interchangeable: the activation has none.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from smptrain.core.errors import CannotBuild, UserError
from smptrain.core.labels import OUTPUT_CLASSES

WEIGHT_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def is_weights_file(value: str) -> bool:
    """Whether a `model.encoder_weights` value names a local file rather than weights known by name ("imagenet",
    "ssl", a timm tag): a path separator, `~`, or a weights suffix. A file without one is written `./name`."""
    return "/" in value or "\\" in value or value.startswith("~") or value.lower().endswith(WEIGHT_FILE_SUFFIXES)


def has_no_weights(value: str) -> bool:
    return value.lower() in ("none", "")


def pretrained_choice(encoder: str, weights: str) -> tuple[str, object]:
    """(encoder name to build, `encoder_weights` for smp) for weights given by name, or a UserError listing the
    names there are. smp encoders: their `pretrained_settings` (imagenet, ssl, swsl, advprop, ...). timm encoders
    (`tu-NAME`): "imagenet" means timm's default pretrained tag (or the tag written in the name, `tu-NAME.TAG`),
    any other value is a timm tag; the tag only chooses the download, the network is the same."""
    import segmentation_models_pytorch as smp

    if encoder.startswith("tu-"):
        import timm

        model, _, tag = encoder[3:].partition(".")
        tags = sorted({name.partition(".")[2] for name in timm.list_pretrained(f"{model}.*")
                       if name.partition(".")[0] == model})
        if not tags:
            raise UserError(f"model.encoder = {encoder!r} has no pretrained weights in timm; use "
                            f"model.encoder_weights = 'none' or a local file")
        if weights == "imagenet":
            return encoder, True
        if weights not in tags:
            raise UserError(f"model.encoder_weights = {weights!r} is not a pretrained tag timm has for {model} "
                            f"(it has: imagenet = the default, {', '.join(tags)}), nor a file")
        return f"tu-{model}.{weights}", True
    settings = smp.encoders.encoders.get(encoder, {}).get("pretrained_settings", {})
    if weights not in settings:
        known = ", ".join(settings) or "none"
        raise UserError(f"model.encoder_weights = {weights!r} is neither 'none', a file (a path, or a name ending in "
                        f"{'/'.join(WEIGHT_FILE_SUFFIXES)}), nor weights smp has for {encoder} ({known})")
    return encoder, weights


def weights_cache() -> str:
    """Where named weights are cached: the Hugging Face hub cache (HF_HOME / HF_HUB_CACHE), which smp and timm use;
    timm weights still served from URLs go to torch hub's (TORCH_HOME)."""
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def create_pretrained(arch: str, encoder: str, in_channels: int, weights: str) -> torch.nn.Module:
    """smp.create_model with named encoder weights, through smp's and timm's own download code (cached; with
    HF_HUB_OFFLINE=1 only the cache is read). With other than 3 bands smp/timm adapt the first convolution."""
    import segmentation_models_pytorch as smp
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError
    from huggingface_hub.utils import logging as hub_logging

    name, smp_weights = pretrained_choice(encoder, weights)
    verbosity = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()  # its warning about the failed request would come before our sentence
    try:
        return smp.create_model(arch, encoder_name=name, encoder_weights=smp_weights, in_channels=in_channels,
                                classes=OUTPUT_CLASSES)
    except OSError as error:  # the hub's LocalEntryNotFoundError, a connection or HTTP error, urllib's URLError
        if isinstance(error, LocalEntryNotFoundError):
            reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        else:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:120]
        raise UserError(f"model.encoder_weights = {weights!r} for {encoder} is not in the cache {weights_cache()} and "
                        f"cannot be downloaded here ({reason}); fill the cache where there is network with "
                        f"`smptrain-inspect --config FILE --download-weights` (same HF_HOME)") from None
    finally:
        hub_logging.set_verbosity(verbosity)


def build_model(arch: str, encoder: str, in_channels: int, encoder_weights: str = "none") -> torch.nn.Module:
    """`smp.create_model(arch, encoder, in_channels=..., classes=1)`: randomly initialised, with named encoder
    weights (downloaded once into the standard caches, see `create_pretrained`), or with a local encoder state dict
    (`encoder_weights` = the path of a .safetensors or .pth file)."""
    import segmentation_models_pytorch as smp

    check_encoder_name(arch, encoder)
    local = Path(encoder_weights).expanduser() if is_weights_file(encoder_weights) else None
    if local is not None and not local.is_file():
        raise UserError(f"model.encoder_weights = {encoder_weights!r}: no such file (give 'none', a weights name "
                        f"such as 'imagenet', or the path of an encoder state dict)")
    try:
        if local is None and not has_no_weights(encoder_weights):
            return create_pretrained(arch, encoder, in_channels, encoder_weights)
        model = smp.create_model(arch, encoder_name=encoder, encoder_weights=None, in_channels=in_channels,
                                 classes=OUTPUT_CLASSES)
    except (KeyError, ValueError, TypeError, RuntimeError) as error:
        message = str(error).strip("'\"").split("\n")[0]
        raise CannotBuild(f"model.arch = {arch!r} with model.encoder = {encoder!r} cannot be built: {message}") from None
    if local is not None:
        load_encoder_weights(model, local, encoder, in_channels)
    return model


def check_encoder_name(arch: str, encoder: str) -> None:
    """An encoder name neither smp nor timm (`tu-NAME`) knows is one short sentence with the closest names, not the
    library's list of hundreds."""
    import difflib

    import segmentation_models_pytorch as smp

    if encoder.startswith("tu-"):
        import timm

        model = encoder[3:].partition(".")[0]
        if timm.is_model(model):
            return
        known = [f"tu-{name}" for name in timm.list_models()]
    else:
        known = list(smp.encoders.get_encoder_names())
        if encoder in known:
            return
    close = difflib.get_close_matches(encoder, known, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}?" if close else "smp's encoders are listed by " \
        "segmentation_models_pytorch.encoders.get_encoder_names(), timm's as tu-NAME"
    raise CannotBuild(f"model.encoder = {encoder!r} is not an encoder smp or timm knows (for model.arch = {arch!r}); "
                      f"{hint}")


def download_weights(encoder: str, weights: str) -> str:
    """Fill the cache with the named weights of `encoder` (what a login node does for offline GPU nodes); returns
    the cache directory. 'none' and local files need nothing."""
    if has_no_weights(weights) or is_weights_file(weights):
        raise UserError(f"model.encoder_weights = {weights!r} is not weights by name; there is nothing to download")
    create_pretrained("Unet", encoder, 3, weights)
    return weights_cache()


def described_model(description: dict, state: dict | None, source: str) -> torch.nn.Module:
    """The network a checkpoint or converted file describes (`{"arch", "encoder_name", "in_channels", "classes"}`,
    smp.create_model's own arguments, as DARTS' SMPSegmenter builds it), with `state` loaded strictly."""
    import segmentation_models_pytorch as smp

    try:
        model = smp.create_model(**{**description, "encoder_weights": None})
    except (KeyError, ValueError, TypeError, RuntimeError) as error:
        message = str(error).strip("'\"").split("\n")[0]
        raise UserError(f"{source}: the model {description} cannot be built: {message}") from None
    if state is not None:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise UserError(f"{source} does not match {description}: {str(error)[:300]}") from None
    return model


def load_encoder_weights(model: torch.nn.Module, path: Path, encoder_name: str, in_channels: int) -> None:
    """Load an encoder state dict (keys may carry an `encoder.` prefix). A first convolution made for another number
    of input channels is adapted the way smp adapts ImageNet weights (repeated and rescaled)."""
    state = read_state_dict(path)
    state = {k.removeprefix("encoder."): v for k, v in state.items() if not k.startswith(("decoder.", "segmentation_head."))}
    encoder = model.encoder
    own = encoder.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched and hasattr(encoder, "set_in_channels"):
        # Load into a 3-channel copy of the first layer, then let smp patch it to `in_channels`.
        import segmentation_models_pytorch as smp

        encoder3 = smp.encoders.get_encoder(encoder_name, in_channels=3, weights=None)
        _strict_load(encoder3, state, path)
        encoder3.set_in_channels(in_channels, pretrained=True)
        state = encoder3.state_dict()
    _strict_load(encoder, state, path)


def _strict_load(module: torch.nn.Module, state: dict, path: Path) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).split("\n")[1].strip() if "\n" in str(error) else str(error)
        raise UserError(f"{path} does not fit this encoder: {first}") from None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, or from a torch file loaded weights-only (never unpickles objects)."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"{path} is not a readable state dict (safetensors, or a weights-only torch file): {error}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} does not hold a state dict of tensors")
    return state


def check_patch_size(model: torch.nn.Module, arch: str, patch_size: int) -> None:
    """Fail early when the architecture cannot take this patch size (Unet needs a multiple of 32)."""
    stride = int(getattr(getattr(model, "encoder", None), "output_stride", 32) or 32)
    if patch_size % stride:
        raise CannotBuild(
            f"patch size {patch_size} is not divisible by {stride}, the output stride of {arch} with this encoder; "
            f"use patches of {patch_size // stride * stride or stride} or {(patch_size // stride + 1) * stride} pixels"
        )


def check_forward(model: torch.nn.Module, arch: str, encoder: str, in_channels: int, patch_size: int,
                  device: torch.device, autocast=contextlib.nullcontext, channels_last: bool = False) -> None:
    """One forward pass of a zero batch (1 x channels x patch x patch) on the training device, without gradients
    and in eval mode (no BatchNorm statistic moves, no random number is drawn): what an architecture, an encoder and
    a patch size cannot do together (a timm window that does not divide the feature map, a stage that pools to
    nothing) fails here as one sentence, before the run directory exists."""
    was_training = model.training
    model.eval()
    x = torch.zeros(1, in_channels, patch_size, patch_size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    try:
        with torch.no_grad(), autocast():
            shape = tuple(model(x).shape)
    except torch.OutOfMemoryError:
        raise UserError(f"model.arch = {arch!r} with model.encoder = {encoder!r} does not fit on {device} even for "
                        f"one {patch_size} x {patch_size} patch") from None
    except Exception as error:  # the library's own reason, whatever it raised (timm asserts)
        raise CannotBuild(f"model.arch = {arch!r} with model.encoder = {encoder!r} cannot take {patch_size} x "
                          f"{patch_size} patches: {_reason(error)}") from None
    finally:
        model.train(was_training)
    if shape[-2:] != (patch_size, patch_size):
        raise CannotBuild(f"model.arch = {arch!r} with model.encoder = {encoder!r} turns {patch_size} x {patch_size} "
                          f"patches into {shape[-2]} x {shape[-1]} logits; choose another patch size or encoder")


def _reason(error: Exception) -> str:
    lines = [line.strip() for line in str(error).strip().strip("'\"").splitlines() if line.strip()]
    return lines[0][:300] if lines else type(error).__name__


def segmentation_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Forward pass returning fp32 logits (B, H, W); `x` comes in the memory format the feed gave it."""
    return model(x).float().squeeze(1)


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(logits.float())



# Backward kernels without a deterministic CUDA implementation (torch.use_deterministic_algorithms' list) that smp
# models can reach: aten name -> what in the model uses it.
NONDETERMINISTIC_ON_CUDA = {
    "upsample_linear1d_backward": "linear upsampling",
    "upsample_bilinear2d_backward": "bilinear upsampling",
    "_upsample_bilinear2d_aa_backward": "bilinear upsampling",
    "upsample_bicubic2d_backward": "bicubic upsampling",
    "_upsample_bicubic2d_aa_backward": "bicubic upsampling",
    "upsample_trilinear3d_backward": "trilinear upsampling",
    "_adaptive_avg_pool2d_backward": "adaptive average pooling to more than 1x1",
    "_adaptive_avg_pool3d_backward": "adaptive average pooling to more than 1x1x1",
    "adaptive_max_pool2d_backward": "adaptive max pooling",
    "adaptive_max_pool3d_backward": "adaptive max pooling",
    "avg_pool3d_backward": "3-d average pooling",
    "fractional_max_pool2d_backward": "fractional max pooling",
    "fractional_max_pool3d_backward": "fractional max pooling",
    "reflection_pad1d_backward": "reflection padding",
    "reflection_pad2d_backward": "reflection padding",
    "reflection_pad3d_backward": "reflection padding",
    "grid_sampler_2d_backward": "grid sampling",
    "grid_sampler_3d_backward": "grid sampling",
}


def nondeterministic_on_cuda(arch: str, encoder: str, in_channels: int, patch_size: int) -> list[str] | None:
    """What a training step of this model runs on CUDA without a deterministic kernel (sorted descriptions; [] when
    every kernel is deterministic under train.deterministic; None when the model could not be traced).

    Found by running one forward and backward pass on the meta device (shapes only, no memory, well under a second)
    and recording every aten operator; an adaptive pooling to 1x1 is a mean and counts as deterministic, as it does in
    PyTorch.
    """
    import segmentation_models_pytorch as smp
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(func._schema.name.split("::")[-1])
            return func(*args, **(kwargs or {}))

    try:
        with torch.device("meta"):
            model = smp.create_model(arch, encoder_name=encoder, encoder_weights=None, in_channels=in_channels,
                                     classes=OUTPUT_CLASSES)
        model = model.to("meta").train()  # some smp modules make their tensors on the CPU regardless
        record = Record()
        with record:  # batch 2: BatchNorm after a global pooling needs more than one value per channel
            model(torch.zeros(2, in_channels, patch_size, patch_size, device="meta")).sum().backward()
    except Exception:  # an operator without a meta kernel, say: unknown, not "exact"
        return None
    return sorted({NONDETERMINISTIC_ON_CUDA[op] for op in record.ops if op in NONDETERMINISTIC_ON_CUDA})


def determinism_note(arch: str, encoder: str, in_channels: int, patch_size: int, device_type: str,
                     deterministic: bool) -> str | None:
    """The one warning a train.deterministic run on CUDA gets when its model uses a backward kernel that has no
    deterministic CUDA implementation (PyTorch would otherwise warn per operator, without saying what it means)."""
    if not deterministic or device_type != "cuda":
        return None  # on the CPU every kernel smptrain uses is deterministic
    inexact = nondeterministic_on_cuda(arch, encoder, in_channels, patch_size)
    if inexact == []:
        return None
    import warnings

    # Said once here; PyTorch's own per-operator warnings would repeat it without the consequence.
    warnings.filterwarnings("ignore", message=".*does not have a deterministic implementation.*")
    what = (f"uses {' and '.join(inexact)} in its backward pass, which has no deterministic CUDA kernel"
            if inexact else "could not be checked for kernels without a deterministic CUDA implementation")
    return (f"warning: train.deterministic: {arch} with {encoder} {what}; this run and its resumed continuation are "
            f"not bitwise exact on CUDA (Unet, UnetPlusPlus, MAnet and Linknet are)")
