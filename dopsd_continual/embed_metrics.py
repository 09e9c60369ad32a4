"""Optional gate metrics from local CLIP / DINO weights (never downloaded: local files only).

- CLIP text-image score: mean cosine similarity between each held-out prompt and its picture; the gate
  compares the candidate with its parent (a drop means prompts are followed less well).
- DINO concept similarity: mean cosine similarity between the round's images and the candidate's
  text-only samples of their captions, against the parent's (did the concept's look arrive).
Images are resized and normalised here (no image processor object, so no torchvision is needed); the
mean/std come from the folder's preprocessor_config.json when it has one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.nn import functional as F

from .errors import UserError

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _norm(images: torch.Tensor, size: int, folder: Path, mean, std) -> torch.Tensor:
    cfg = folder / "preprocessor_config.json"
    if cfg.exists():
        c = json.loads(cfg.read_text())
        mean, std = c.get("image_mean", mean), c.get("image_std", std)
    x = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


class ClipScorer:
    def __init__(self, folder: str):
        from transformers import AutoTokenizer, CLIPModel

        self.folder = Path(folder).expanduser()
        try:
            self.model = CLIPModel.from_pretrained(self.folder, local_files_only=True).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        except OSError as e:
            raise UserError(f"gate.clip_model: cannot load local CLIP weights from {self.folder}: {str(e).splitlines()[0]}") from None

    @torch.no_grad()
    def text_image_scores(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        size = self.model.config.vision_config.image_size
        pix = _norm(images, size, self.folder, CLIP_MEAN, CLIP_STD)
        tok = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.model.config.text_config.max_position_embeddings,
                             return_tensors="pt")
        img = _features(self.model.get_image_features(pixel_values=pix))
        txt = _features(self.model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]))
        return (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)


def _features(out) -> torch.Tensor:
    """transformers 5 returns a model output where 4.x returned the projected tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class DinoScorer:
    def __init__(self, folder: str):
        from transformers import AutoModel

        self.folder = Path(folder).expanduser()
        try:
            self.model = AutoModel.from_pretrained(self.folder, local_files_only=True).eval()
        except OSError as e:
            raise UserError(f"gate.dino_model: cannot load local DINO weights from {self.folder}: {str(e).splitlines()[0]}") from None

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        size = self.model.config.image_size
        out = self.model(pixel_values=_norm(images, size, self.folder, IMAGENET_MEAN, IMAGENET_STD))
        return F.normalize(out.last_hidden_state[:, 0], dim=-1)

    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (self.embed(a) * self.embed(b)).sum(-1)
