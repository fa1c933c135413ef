"""Encoder weights by name (`model.encoder_weights = "imagenet"`), read offline from a Hugging Face hub cache that the
test builds in the layout the hub library reads (nothing can be downloaded here), and the sentence when they are not
there."""

from __future__ import annotations

import json

import torch
from helpers import run, tiny_config

ENCODER = "resnet18"


def hub_cache(root, weights: str = "imagenet"):
    """HF_HOME with smp's repository for resnet18 `weights` at the pinned revision (files in the snapshot, as after
    a download), holding a seeded random encoder state; returns (HF_HOME, that state)."""
    import segmentation_models_pytorch as smp
    from safetensors.torch import save_file

    settings = smp.encoders.encoders[ENCODER]["pretrained_settings"][weights]
    org, name = settings["repo_id"].split("/")
    snapshot = root / "hub" / f"models--{org}--{name}" / "snapshots" / settings["revision"]
    snapshot.mkdir(parents=True)
    torch.manual_seed(7)
    state = smp.encoders.get_encoder(ENCODER, in_channels=3, weights=None).state_dict()
    save_file(state, str(snapshot / "model.safetensors"))
    (snapshot / "config.json").write_text(json.dumps({"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}))
    return root, state


def offline(hf_home) -> dict:
    return {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(hf_home / "torch")}


def test_named_weights_load_from_the_cache_offline_and_the_first_layer_is_adapted(tmp_path, demo_dir):
    from safetensors.torch import load_file

    hf_home, state = hub_cache(tmp_path / "hf")
    out = tmp_path / "encoder.safetensors"
    script = ("import sys\nfrom safetensors.torch import save_file\nfrom smptrain.model.network import build_model\n"
              "model = build_model('Unet', 'resnet18', 7, 'imagenet')\n"
              "save_file({k: v.contiguous() for k, v in model.encoder.state_dict().items()}, sys.argv[1])\n")
    run(["python", "-c", script, str(out)], check=True, **offline(hf_home))
    loaded = load_file(str(out))
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state if k != "conv1.weight")
    # smp's adaptation for 7 bands: the RGB filters repeated over the bands and scaled by 3/7
    first = state["conv1.weight"]
    expected = torch.stack([first[:, i % 3] for i in range(7)], dim=1) * (3 / 7)
    assert torch.allclose(loaded["conv1.weight"], expected)

    # the cache-filling command finds them too, and a config naming them trains offline
    filled = run(["smptrain-inspect", "--config", str(tiny_config(tmp_path, demo_dir)), "--set",
                  "model.encoder_weights=imagenet", "--download-weights"], check=True, **offline(hf_home))
    assert str(hf_home / "hub") in filled.stdout
    config = tiny_config(tmp_path, demo_dir, model={"encoder_weights": "imagenet"}, train={"max_epochs": 1},
                         log={"preview_every_n_val": 0})
    run(["python", "-m", "smptrain.train", "--config", str(config), "--set", "log.run_name=pretrained"], check=True,
        **offline(hf_home))
    meta = json.loads((tmp_path / "artifacts" / "pretrained" / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["config"]["model"]["encoder_weights"] == "imagenet"  # a name, not made into a path


def test_named_weights_missing_offline_are_one_sentence_before_anything_is_written(tmp_path, demo_dir):
    hf_home = tmp_path / "empty"
    config = tiny_config(tmp_path, demo_dir, model={"encoder_weights": "imagenet"})
    done = run(["python", "-m", "smptrain.train", "--config", str(config), "--set", "log.run_name=never"],
               **offline(hf_home))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    error = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1
    for part in ("'imagenet'", ENCODER, str(hf_home / "hub"), "--download-weights"):
        assert part in error[0]
    assert not (tmp_path / "artifacts").exists() or not any((tmp_path / "artifacts").iterdir())

    unknown = run(["python", "-m", "smptrain.train", "--config", str(config), "--set", "log.run_name=never",
                   "--set", "model.encoder_weights=instagram"], **offline(hf_home))
    assert unknown.returncode == 2 and "imagenet, ssl, swsl" in unknown.stderr, unknown.stderr[-2000:]
