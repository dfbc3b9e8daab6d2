"""CLIP ViT-B/32 image tower through open_clip (the paper's main backbone), 512-d features."""

from __future__ import annotations

from PIL import Image

from gatrep.backbones import Backbone, Encoder, register, weights
from gatrep.images import Preprocess

# open_clip's 'openai' ViT-B-32 weights: its Hugging Face mirror, and the original file name that
# open_clip's URL download caches under ~/.cache/clip.
_SOURCE = weights.WeightsSource(
    filenames=("ViT-B-32.pt",),
    extra_dirs=("~/.cache/clip",),
    hf_repo="timm/vit_base_patch32_clip_224.openai",
    hf_files=("open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
)


def _load(weights_spec: str, device: str) -> Encoder:
    import open_clip
    import torch

    from gatrep.backbones.torch_encoder import BadWeights, TorchEncoder

    path = weights.resolve("clip-vit-b32", weights_spec, _SOURCE)
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", force_quick_gelu=True)  # openai weights use QuickGELU
    if path is not None:
        # open_clip's own loader (it also adapts OpenAI's TorchScript and older checkpoints to the model)
        try:
            open_clip.load_checkpoint(model, str(path))
        except Exception as err:  # open_clip and torch raise many types for a file that is not a checkpoint
            raise BadWeights(f"{path} is not a ViT-B-32 checkpoint ({type(err).__name__}: {str(err)[:300]})") from err
    return TorchEncoder(model.visual, 512, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD, device)


register(Backbone(
    name="clip-vit-b32", dim=512,
    preprocess=Preprocess(size=224, crop_fraction=1.0, resample=Image.Resampling.BICUBIC),
    load=_load,
    description="open_clip ViT-B-32 image tower (openai weights), 512-d features",
))
