"""Z-Image-Turbo: a tiny random-weight pipeline and Qwen3-VL teacher, saved and loaded like the real ones."""

import sys
from pathlib import Path

import pytest
import torch

from dopsd_continual.errors import UserError
from dopsd_continual.families.zimage import ZImageBackend, load_teacher_encoder, share_text_weights_with_vl
from dopsd_continual.training import add_adapters, dopsd_loss_and_backward, remove_adapters, train_delta

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from gpu_e2e import tokenizer  # noqa: E402  (the tiny Qwen tokenizer with chat template and vision tokens)

HIDDEN = 64


def tiny_tokenizer():
    return tokenizer(max_length=64)


def text_config(vocab, layers=2):
    return dict(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=layers,
                num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=512)


@pytest.fixture(scope="module")
def zimage_dirs(tmp_path_factory):
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        ZImagePipeline,
        ZImageTransformer2DModel,
    )
    from transformers import (
        Qwen2VLImageProcessorPil,
        Qwen3Config,
        Qwen3Model,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
    )

    root = tmp_path_factory.mktemp("zimage")
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    te = Qwen3Model(Qwen3Config(**text_config(len(tok))))
    tr = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=64, n_layers=2,
                                  n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=HIDDEN,
                                  axes_dims=[8, 12, 12], axes_lens=[512, 64, 64])
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, scaling_factor=0.3611, shift_factor=0.1159)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0)
    pipe = ZImagePipeline(scheduler=sched, vae=vae, text_encoder=te, tokenizer=tok, transformer=tr)
    pipe.save_pretrained(root / "zimage")
    image_token = tok.convert_tokens_to_ids("<|image_pad|>")
    vl_cfg = Qwen3VLConfig(
        text_config={**text_config(len(tok)), "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                                   "mrope_section": [8, 4, 4], "mrope_interleaved": True}},
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=HIDDEN,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, deepstack_visual_indexes=[0],
                           num_position_embeddings=64),
        image_token_id=image_token, video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
    )
    vl = Qwen3VLForConditionalGeneration(vl_cfg)
    vl.save_pretrained(root / "vl")
    ip = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=64 * 64, max_pixels=64 * 64)
    ip.save_pretrained(root / "vl")
    tok.save_pretrained(root / "vl")
    return root


@pytest.fixture(scope="module")
def backend(zimage_dirs):
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(zimage_dirs / "zimage")
    pipe.set_progress_bar_config(disable=True)
    vl, proc = load_teacher_encoder(str(zimage_dirs / "vl"), pipe.text_encoder, "cpu")
    recipe = {"model": {"source": str(zimage_dirs / "zimage"), "teacher_encoder": str(zimage_dirs / "vl"),
                        "max_sequence_length": 64, "teacher_instruction": "Keep the subject of the image.",
                        "height": 64, "width": 64,
                        "teacher_min_pixels": 64 * 64, "teacher_max_pixels": 64 * 64}}
    return ZImageBackend(pipe, recipe, "cpu", vl, proc)


def test_pipeline_loads_and_samples(zimage_dirs):
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(zimage_dirs / "zimage")
    pipe.set_progress_bar_config(disable=True)
    img = pipe(prompt="a red circle", height=64, width=64, num_inference_steps=2, guidance_scale=0.0,
               generator=torch.Generator("cpu").manual_seed(0), output_type="pt", max_sequence_length=64).images
    assert img.shape == (1, 3, 64, 64) and torch.isfinite(img).all()


def test_teacher_shares_the_text_encoders_weights_by_key(backend):
    """One copy of the language weights in the features phase: the teacher's are the text encoder's own tensors."""
    te = dict(backend.pipe.text_encoder.named_parameters())
    lm = dict(backend.teacher_model.model.language_model.named_parameters())
    for key in ("layers.0.self_attn.q_proj.weight", "embed_tokens.weight", "norm.weight"):
        assert lm[key] is te[key]
    shared = {id(p) for p in te.values()}
    own = [n for n, p in backend.teacher_model.named_parameters() if id(p) not in shared]
    assert own and all(not n.startswith("model.language_model.") for n in own)  # only the vision tower is its own


def test_feature_key_holds_every_setting_that_changes_a_feature(backend):
    base = backend.encoder_id
    for key, value in (("width", 128), ("teacher_min_pixels", 32 * 32), ("teacher_max_pixels", 32 * 32),
                       ("teacher_instruction", "other"), ("teacher_instruction_position", "before")):
        had, old = key in backend.model, backend.model.get(key)
        backend.model[key] = value
        try:
            assert backend.encoder_id != base, key
        finally:
            if had:
                backend.model[key] = old
            else:
                del backend.model[key]
    assert backend.encoder_id == base


def test_teacher_text_puts_the_instruction_after_the_caption_as_the_authors_do():
    from dopsd_continual.recipe import teacher_text

    m = {"teacher_instruction": "Keep the subject."}
    assert teacher_text("my mug", m) == "my mug Keep the subject."
    assert teacher_text("my mug", {**m, "teacher_instruction_position": "before"}) == "Keep the subject. my mug"
    assert teacher_text("my mug", {"teacher_instruction": ""}) == "my mug"


def test_mismatched_teacher_is_a_clear_error(zimage_dirs):
    from transformers import Qwen3Config, Qwen3Model, Qwen3VLForConditionalGeneration

    vl = Qwen3VLForConditionalGeneration.from_pretrained(zimage_dirs / "vl")
    other = Qwen3Model(Qwen3Config(**text_config(vl.config.text_config.vocab_size, layers=3)))
    with pytest.raises(UserError, match="does not match Z-Image's text encoder"):
        share_text_weights_with_vl(vl, other)


def test_velocity_matches_the_pipeline_convention(backend):
    """The backend's velocity steps the latents exactly as ZImagePipeline's loop does."""
    feats = backend.features("a red circle", torch.rand(3, 64, 64))
    assert feats["teacher_text"].shape[1] == HIDDEN and feats["teacher_text"].shape[0] > feats["student_text"].shape[0]
    x = torch.randn(1, *feats["latents"].shape)
    sig = torch.tensor([0.8])
    cond = backend.conditions([feats], teacher=False)
    with torch.no_grad():
        v = backend.velocity(x, sig, cond)
        out = backend.transformer(list(x.unsqueeze(2).unbind(0)), (1000 - sig * 1000) / 1000, cond, return_dict=False)[0]
    torch.testing.assert_close(v, -torch.stack(out).squeeze(2).float())


def test_dopsd_math_and_a_short_round(backend):
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    feats = [backend.features(c, torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i)))
             for i, c in enumerate(["a red circle", "a blue square"])]
    student = add_adapters(backend.transformer, 4, 4, targets)
    try:
        noise = torch.randn(2, *feats[0]["latents"].shape, generator=torch.Generator().manual_seed(0))
        sig = backend.sigmas(4)
        assert dopsd_loss_and_backward(backend, feats, sig, noise, teacher_same_as_student=True) == 0.0
        assert all(p.grad is None or p.grad.abs().max() == 0 for p in student)
        assert dopsd_loss_and_backward(backend, feats, sig, noise) > 0
        assert max(p.grad.abs().max() for p in student if p.grad is not None) > 0
    finally:
        remove_adapters(backend.transformer)
    train = {"seed": 0, "rank": 4, "alpha": 4, "targets": targets, "lr": 1e-3, "steps": 2, "batch": 2, "K": 2,
             "schedule": "pipeline", "replay_ratio": 0.0, "ema_decay": 0.99, "mixed_precision": "no"}
    res = train_delta(backend, feats, [], train, "dopsd")
    assert len(res.losses) == 2 and res.delta.weights
    res = train_delta(backend, feats, [], train, "sft")
    assert len(res.losses) == 2


def test_pipeline_sigmas_match(backend):
    s = backend.sigmas(4)
    assert s[0] == pytest.approx(1.0) and s[-1] == 0.0 and len(s) == 5 and all(a > b for a, b in zip(s, s[1:]))


def test_cache_dir_is_per_encoder(backend, tmp_path):
    from dopsd_continual.training import FeatureCache

    assert Path(FeatureCache(tmp_path, backend.encoder_id).dir).name == backend.encoder_id


def test_a_full_round_on_tiny_zimage_through_the_cli(zimage_dirs, tmp_path):
    """Recipe -> from_pretrained -> features (VL teacher) -> D-OPSD round -> gate -> version -> sample."""
    import json

    from conftest import make_pair
    from typer.testing import CliRunner

    from dopsd_continual.cli import app
    from dopsd_continual.recipe import RECIPES_DIR

    text = (RECIPES_DIR / "z-image-turbo.toml").read_text()
    text = text.replace('"Tongyi-MAI/Z-Image-Turbo"', json.dumps(str(zimage_dirs / "zimage")))
    text = text.replace('"Qwen/Qwen3-VL-4B-Instruct"', json.dumps(str(zimage_dirs / "vl")))
    text = text.replace("height = 1024", "height = 64").replace("width = 1024", "width = 64")
    text = text.replace("max_sequence_length = 512", "max_sequence_length = 64").replace("steps = 300", "steps = 2")
    text = text.replace("steps = 8 ", "steps = 2 ").replace("min_side = 256", "min_side = 32").replace('dtype = "bfloat16"', 'dtype = "float32"')
    recipe = tmp_path / "z.toml"
    recipe.write_text(text)
    drop = tmp_path / "drop"
    for i in range(2):
        make_pair(drop, f"p{i}", "a photo of my mug", seed=i)
    r = CliRunner()
    assert r.invoke(app, ["init", "--state", str(tmp_path / "s"), "--recipe", str(recipe), "--watch", str(drop)]).exit_code == 0
    assert r.invoke(app, ["ingest", "--state", str(tmp_path / "s")]).exit_code == 0
    res = r.invoke(app, ["train", "--json", "--state", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["version"] == "v1" and out["verdict"] in ("accepted", "rejected")
    assert "drift" in out["metrics"] and "retention" not in out["metrics"]  # generic guards; no toy scorer
    s = r.invoke(app, ["sample", "a photo of my mug", "--version", "v1", "--out", str(tmp_path / "m.png"),
                       "--json", "--state", str(tmp_path / "s")])
    assert s.exit_code == 0, s.output
    # the next round as two processes: the ranks load Z-Image without its text encoder and train on the cache
    for i in range(2, 4):
        make_pair(drop, f"p{i}", "a photo of my mug", seed=i)
    assert r.invoke(app, ["ingest", "--state", str(tmp_path / "s")]).exit_code == 0
    res = r.invoke(app, ["train", "--json", "--processes", "2", "--state", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["version"] == "v2" and out["metrics"]["processes"] == 2 and out["verdict"] in ("accepted", "rejected")
