"""Score the tiny ImageReward checkpoint with the ORIGINAL ImageReward code (run in a scratch venv, not in CI).

Produces tests/data/imagereward_tiny_reference.json; the full recipe is in docs/METRICS.md. Usage::

    /tmp/ir-venv/bin/python tests/data/imagereward_original_scores.py SRC CASE_DIR OUT.json

SRC: a checkout of github.com/THUDM/ImageReward (its ``ImageReward/`` folder is used as is); CASE_DIR: written
by ``tests/unit/test_imagereward.py::write_case`` (ImageReward.pt, med_config.json, tokenizer/vocab.txt,
img*.png, prompts.json). Upstream hard-codes a ViT-L/224 in ``ImageReward.__init__`` and loads the hub's
``bert-base-uncased`` tokenizer, so this script assembles upstream's own classes (``VisionTransformer``,
``BertModel`` from med.py, ``MLP``, ``_transform``) at the tiny sizes and calls upstream's
``ImageReward.score`` on them unchanged.
"""

import json
import sys
import types
from pathlib import Path

import torch

# torchvision's PyPI wheel (a CUDA build) cannot load its C++ ops beside a CPU torch, and its import then
# fails on two unguarded fake-op registrations; only its PIL transforms are used here, so define those two op
# schemas so that torchvision imports (scratch environment only).
_lib = torch.library.Library("torchvision", "DEF")  # noqa: F841 (kept alive)
_lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")

src, case, out = (Path(a) for a in sys.argv[1:4])
# Skip the packages' __init__ files (they import ReFL/diffusers and the clip package); load the modules used.
for name in ("ImageReward", "ImageReward.models", "ImageReward.models.BLIP"):
    pkg = types.ModuleType(name)
    pkg.__path__ = [str(src / name.replace(".", "/"))]
    sys.modules[name] = pkg

from ImageReward.ImageReward import MLP, ImageReward, _transform  # noqa: E402
from ImageReward.models.BLIP.med import BertConfig, BertModel  # noqa: E402
from ImageReward.models.BLIP.vit import VisionTransformer  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import BertTokenizer  # noqa: E402

state = torch.load(case / "ImageReward.pt", map_location="cpu", weights_only=True)
width = state["blip.visual_encoder.cls_token"].shape[-1]
patch = state["blip.visual_encoder.patch_embed.proj.weight"].shape[-1]
size = int(round((state["blip.visual_encoder.pos_embed"].shape[1] - 1) ** 0.5)) * patch
depth = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("blip.visual_encoder.blocks."))
mlp_ratio = state["blip.visual_encoder.blocks.0.mlp.fc1.weight"].shape[0] / width

# As upstream's blip.init_tokenizer, from a local vocab instead of the hub.
tokenizer = BertTokenizer(str(case / "tokenizer" / "vocab.txt"))
tokenizer.add_special_tokens({"bos_token": "[DEC]"})
tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})

blip = torch.nn.Module()
blip.visual_encoder = VisionTransformer(
    img_size=size, patch_size=patch, embed_dim=width, depth=depth, num_heads=width // 64, mlp_ratio=mlp_ratio
)
med = BertConfig.from_json_file(str(case / "med_config.json"))
med.encoder_width = width
blip.text_encoder = BertModel(config=med, add_pooling_layer=False)
blip.tokenizer = tokenizer
blip.vision_proj = torch.nn.Linear(width, 256)
blip.text_proj = torch.nn.Linear(med.hidden_size, 256)

model = ImageReward.__new__(ImageReward)
torch.nn.Module.__init__(model)
model.device = "cpu"
model.blip = blip
model.preprocess = _transform(size)
model.mlp = MLP(med.hidden_size)
model.mean, model.std = 0.16717362830052426, 1.0333394966054072  # as upstream's __init__
missing, unexpected = model.load_state_dict(state, strict=False)
# The tiny file lacks only BLIP's contrastive projections (unused by score()) and a buffer.
assert set(missing) <= {"blip.text_encoder.embeddings.position_ids", "blip.vision_proj.weight", "blip.vision_proj.bias", "blip.text_proj.weight",
                        "blip.text_proj.bias"}, missing
assert not [k for k in unexpected if not k.endswith("position_ids")], unexpected
model.eval()

prompts = json.loads((case / "prompts.json").read_text())
images = sorted(case.glob("img*.png"))
with torch.no_grad():
    scores = [model.score(p, Image.open(f)) for p, f in zip(prompts, images, strict=True)]
import transformers  # noqa: E402
import timm  # noqa: E402

out.write_text(json.dumps({
    "scores": scores,
    "checkpoint_checksum": json.loads((case / "checksum.json").read_text())["checkpoint_checksum"],
    "prompts": prompts,
    "images": [f.name for f in images],
    "produced_with": {
        "imagereward_source": "THUDM/ImageReward (see docs/METRICS.md for the commit)",
        "torch": torch.__version__, "transformers": transformers.__version__, "timm": timm.__version__,
    },
}, indent=2) + "\n")
print(json.dumps(scores))
