"""Optional CLIP / DINO gate metrics from local folders: tiny random models saved and loaded offline."""

import json

import pytest
import torch

from dopsd_continual.embed_metrics import ClipScorer, DinoScorer
from dopsd_continual.errors import UserError


@pytest.fixture(scope="module")
def local_models(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model

    from dopsd_continual.toy.model import build_tokenizer

    root = tmp_path_factory.mktemp("embed")
    torch.manual_seed(0)
    tok = build_tokenizer()
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64, eos_token_id=tok.eos_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16))
    clip.save_pretrained(root / "clip")
    tok.save_pretrained(root / "clip")
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8)).save_pretrained(root / "dino")
    return root


def test_clip_and_dino_scores(local_models, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    imgs = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    clip = ClipScorer(str(local_models / "clip"))
    s = clip.text_image_scores(imgs, ["a red circle", "a blue square", "a heart"])
    assert s.shape == (3,) and torch.all(s.abs() <= 1.0001)
    torch.testing.assert_close(s, clip.text_image_scores(imgs, ["a red circle", "a blue square", "a heart"]))
    dino = DinoScorer(str(local_models / "dino"))
    same = dino.similarity(imgs, imgs)
    torch.testing.assert_close(same, torch.ones(3), atol=1e-5, rtol=0)
    assert dino.similarity(imgs, imgs.flip(0))[0] < 1


def test_missing_local_weights_are_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="gate.clip_model"):
        ClipScorer(str(tmp_path / "nothing"))
    with pytest.raises(UserError, match="gate.dino_model"):
        DinoScorer(str(tmp_path / "nothing"))


def test_gate_uses_them_when_the_recipe_points_at_them(local_models, tmp_path):
    from dopsd_continual.ingest import ingest_paths
    from dopsd_continual.recipe import RECIPES_DIR
    from dopsd_continual.rounds import run_round
    from dopsd_continual.store import init_state
    from dopsd_continual.toy.packs import write_pack

    text = (RECIPES_DIR / "toy-shapes.toml").read_text().replace(
        "[gate]\n", f'[gate]\nclip_model = {json.dumps(str(local_models / "clip"))}\ndino_model = {json.dumps(str(local_models / "dino"))}\n')
    recipe = tmp_path / "r.toml"
    recipe.write_text(text)
    write_pack("logo", tmp_path / "drop")
    st = init_state(tmp_path / "s", str(recipe), [tmp_path / "drop"])
    ingest_paths(st)
    r = run_round(st, steps=2)
    for k in ("clip_score", "clip_score_parent", "clip_drop", "dino_concept", "dino_concept_parent"):
        assert k in r["metrics"]
    report = json.loads((st.reports / f"{r['version']}.json").read_text())
    assert "clip_drop" in report["metrics"] and "max_clip_drop" in report["thresholds"]
    st.close()
