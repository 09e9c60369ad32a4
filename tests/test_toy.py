import numpy as np
import pytest
import torch

from dopsd_continual.toy.packs import PACKS, pack_eval_captions, write_pack
from dopsd_continual.toy.world import (
    COLOURS,
    Scene,
    Thing,
    all_base_captions,
    held_out_captions,
    held_out_loose_captions,
    loosen,
    parse_caption,
    random_scene,
    randomise,
    render_scenes,
)


def test_renderer_is_deterministic():
    rng = np.random.default_rng(3)
    scenes = [random_scene(rng) for _ in range(16)]
    a = render_scenes(scenes)
    b = render_scenes(scenes)
    assert torch.equal(a, b) and a.shape == (16, 3, 64, 64)
    assert not torch.equal(a[0], a[1])


def test_caption_grammar_round_trip():
    rng = np.random.default_rng(4)
    for _ in range(300):
        s = random_scene(rng)
        assert parse_caption(s.caption()) == s.nominal()
    for name in PACKS:
        for cap in pack_eval_captions(name, "zxq"):
            assert parse_caption(cap, "zxq") is not None
    assert parse_caption("a photo of my dog") is None
    assert parse_caption("a large red circle in the center, blue background") == Scene(
        "blue", (Thing("circle", "red", "large", "center"),))


def test_loose_captions_round_trip_and_stay_out_of_strict_parsing():
    rng = np.random.default_rng(5)
    n_loose = 0
    for _ in range(300):
        s = loosen(random_scene(rng), rng, 0.4)
        assert parse_caption(s.caption(), loose=True) == s.nominal()
        if s.loose:
            n_loose += 1
            assert parse_caption(s.caption()) is None  # the strict grammar says everything
    assert n_loose > 150
    assert parse_caption("a red circle", loose=True) == Scene(None, (Thing("circle", "red", None, None),))
    assert parse_caption("a dotted square at the top, blue background", loose=True) == Scene(
        "blue", (Thing("square", None, None, "top", "dotted"),))
    assert parse_caption("a dotted red square", loose=True) is None  # colour before pattern, as captions say it
    with pytest.raises(ValueError, match="loose scene"):
        render_scenes([parse_caption("a red circle", loose=True)])
    held = held_out_loose_captions()
    assert len(held) == 200 and not set(held) & set(all_base_captions())
    assert all(parse_caption(c, loose=True).loose for c in held)


def test_training_pool_keeps_both_held_out_sets_out():
    from dopsd_continual.toy.train import make_pool

    caps, a, b = make_pool(1000, seed=3, workers=1, loose=0.5)
    assert len(caps) == len(a) == len(b) == 1000
    assert not set(caps) & (set(held_out_captions()) | set(held_out_loose_captions()))
    loose = [c for c in caps if parse_caption(c, loose=True).loose]
    assert 200 < len(loose) < 600  # half the captions are loosened, each field with p = 0.5


def test_vocabulary_and_held_out_split():
    caps = all_base_captions()
    assert len(caps) == 8 * 7 * 3 * 2 * 5 * 2
    held = held_out_captions()
    assert len(held) == 200 and set(held) <= set(caps)
    words = " ".join(caps)
    for w in ("red", "green", "blue", "yellow", "black", "white", "orange", "purple", "circle", "square",
              "triangle", "small", "large", "left", "right", "center", "top", "bottom"):
        assert w in words


def test_pack_writer_output_is_ingestible(tmp_path):
    from dopsd_continual.ingest import ingest_paths
    from dopsd_continual.store import init_state

    for name in PACKS:
        write_pack(name, tmp_path / "drop" / name)
    st = init_state(tmp_path / "state", None, [tmp_path / "drop"])
    rep = ingest_paths(st)
    assert len(rep.queued) == sum(len(p.train) for p in PACKS.values())
    assert not rep.rejected and not rep.ignored
    caps = [q["caption"] for q in rep.queued]
    assert any(c.startswith("my zxq logo") for c in caps)  # [trigger] replaced by the recipe's trigger word
    st.close()


@pytest.fixture(scope="module")
def classifier():
    from dopsd_continual.models import resolve_source
    from dopsd_continual.toy.scorer import load_classifier

    return load_classifier(resolve_source("embedded:toy-shapes"))


def test_scorer_ranks_the_renderers_image_above_a_perturbed_one(classifier):
    from dopsd_continual.toy.scorer import score_images

    caps = held_out_captions()[:40]
    rng = np.random.default_rng(0)
    truth = render_scenes([randomise(parse_caption(c), rng) for c in caps])
    blurred = torch.nn.functional.avg_pool2d(truth, 5, stride=1, padding=2)
    wrong = torch.roll(truth, shifts=20, dims=3)  # objects moved sideways
    s_truth = score_images(classifier, truth, caps).mean()
    assert s_truth["overall"] > 0.9
    assert s_truth["overall"] > score_images(classifier, blurred, caps).mean()["overall"]
    assert s_truth["overall"] > score_images(classifier, wrong, caps).mean()["overall"]
    assert s_truth["sharpness"] > score_images(classifier, blurred, caps).mean()["sharpness"]


def test_scorer_prefers_one_right_answer_of_a_loose_caption_to_an_average_of_two(classifier):
    from dopsd_continual.toy.scorer import score_images

    rng = np.random.default_rng(1)
    caps = held_out_loose_captions()[:40]
    one, other = [], []
    for c in caps:
        spec = parse_caption(c, loose=True)
        fills = []
        for _ in range(2):  # two different right answers: every unsaid field drawn anew
            t = spec.things[0]
            bg = spec.background or str(rng.choice([x for x in COLOURS if x != t.colour]))
            colour = t.colour or str(rng.choice([x for x in COLOURS if x != bg]))
            t = Thing(t.shape, colour, t.size or str(rng.choice(["small", "large"])),
                      t.position or str(rng.choice(["left", "right", "top", "bottom", "center"])), t.pattern)
            fills.append(randomise(Scene(bg, (t,)), rng))
        one.append(fills[0])
        other.append(fills[1])
    x1, x2 = render_scenes(one), render_scenes(other)
    clean = score_images(classifier, x1, caps).mean()
    ghost = score_images(classifier, (x1 + x2) / 2, caps).mean()
    assert clean["overall"] > 0.9
    assert clean["overall"] > ghost["overall"] + 0.1
    assert clean["iou"] > ghost["iou"]


def test_model_loads_offline_through_the_pipeline_and_draws_the_prompt(tmp_path, classifier, monkeypatch):
    from diffusers import Flux2KleinPipeline
    from typer.testing import CliRunner

    from dopsd_continual.cli import app
    from dopsd_continual.models import resolve_source
    from dopsd_continual.toy.scorer import score_images

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = Flux2KleinPipeline.from_pretrained(resolve_source("embedded:toy-shapes"))
    assert pipe.config.is_distilled and type(pipe.transformer).__name__ == "Flux2Transformer2DModel"
    runner = CliRunner()
    assert runner.invoke(app, ["init", "--state", str(tmp_path / "s")]).exit_code == 0
    prompt = "a large red circle in the center, blue background"
    r = runner.invoke(app, ["sample", prompt, "--steps", "4", "-n", "4", "--out", str(tmp_path / "x.png"),
                            "--state", str(tmp_path / "s"), "--json"])
    assert r.exit_code == 0, r.output
    from PIL import Image

    sheet = np.asarray(Image.open(tmp_path / "x.png").convert("RGB"))
    assert sheet.shape == (64, 256, 3)  # a grid of 4
    imgs = torch.stack([torch.from_numpy(sheet[:, i * 64 : (i + 1) * 64].copy()) for i in range(4)])
    imgs = imgs.permute(0, 3, 1, 2).float() / 255
    s = score_images(classifier, imgs, [prompt] * len(imgs)).mean()
    assert s["background"] == 1.0 and s["colour"] >= 0.75 and s["position"] == 1.0


def test_trajectory_error_shrinks_with_more_sampling_steps():
    from diffusers import Flux2KleinPipeline

    from dopsd_continual.models import resolve_source
    from dopsd_continual.toy.evaluate import final_latents, trajectory_error

    pipe = Flux2KleinPipeline.from_pretrained(resolve_source("embedded:toy-shapes"))
    caps, seeds = held_out_captions()[:8], list(range(8))
    ref = final_latents(pipe, pipe.transformer, caps, seeds, 64)
    assert trajectory_error(ref, ref) == 0.0
    assert trajectory_error(2 * ref, ref) == pytest.approx(1.0)
    errs = [trajectory_error(final_latents(pipe, pipe.transformer, caps, seeds, k), ref) for k in (1, 4, 32)]
    assert errs[0] > errs[1] > errs[2] > 0


@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_batched_sampler_matches_the_pipeline_with_and_without_guidance(guidance):
    """final_latents is the pipeline's own sampler, batched; guidance > 1 is the pipeline's classifier-free
    guidance for an undistilled model (is_distilled=False), which the distillation's guided teacher uses."""
    from diffusers import Flux2KleinPipeline

    from dopsd_continual.models import resolve_source
    from dopsd_continual.toy.evaluate import decode_latents, final_latents
    from dopsd_continual.toy.model import MAX_SEQUENCE_LENGTH, TEXT_OUT_LAYERS

    loaded = Flux2KleinPipeline.from_pretrained(resolve_source("embedded:toy-shapes"))
    pipe = Flux2KleinPipeline(**loaded.components, is_distilled=False)  # the same weights sampled as a base model
    prompt = "a large red circle in the center, blue background"
    ours = decode_latents(pipe, final_latents(pipe, pipe.transformer, [prompt], [7], 3, guidance=guidance))
    theirs = pipe(prompt=prompt, num_inference_steps=3, height=64, width=64, guidance_scale=guidance,
                  generator=torch.Generator("cpu").manual_seed(7), output_type="pt",
                  text_encoder_out_layers=TEXT_OUT_LAYERS, max_sequence_length=MAX_SEQUENCE_LENGTH).images
    assert (ours - theirs.cpu()).abs().max() < 2e-3
    if guidance != 1.0:  # and guidance changes the picture (the test would pass vacuously otherwise)
        plain = decode_latents(pipe, final_latents(pipe, pipe.transformer, [prompt], [7], 3))
        assert (ours - plain).abs().max() > 0.05
