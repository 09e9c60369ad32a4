"""The toy model's training script end to end on the CPU with tiny budgets (about 10 s)."""

import json

import torch


def test_training_stages_resume_and_export(tmp_path):
    from diffusers import Flux2KleinPipeline

    from dopsd_continual.toy.train import main

    args = ["--workdir", str(tmp_path / "w"), "--device", "cpu", "--pool", "64", "--workers", "1",
            "--batch", "4", "--batch-vae", "4", "--batch-distill", "2", "--substeps", "1"]
    main(["--stage", "all", "--budget", "vae=1", "--budget", "base=1", "--budget", "distill=1",
          "--out", str(tmp_path / "model"), "--scorer", str(tmp_path / "none"), *args])
    prog = json.loads((tmp_path / "w" / "progress.json").read_text())
    assert all(prog[s]["done"] and prog[s]["steps"] > 0 for s in ("vae", "base", "distill"))
    # resuming a stage continues from its checkpoint and its counters
    steps = prog["base"]["steps"]
    main(["--stage", "base", "--budget", "base=2", *args])
    assert json.loads((tmp_path / "w" / "progress.json").read_text())["base"]["steps"] > steps
    pipe = Flux2KleinPipeline.from_pretrained(tmp_path / "model")
    assert pipe.config.is_distilled
    # the decoder-only stage changes the decoder and nothing the transformer depends on
    from safetensors.torch import load_file

    before = load_file(str(tmp_path / "w" / "vae.safetensors"))
    main(["--stage", "decoder", "--budget", "decoder=1", *args])
    after = load_file(str(tmp_path / "w" / "vae.safetensors"))
    assert json.loads((tmp_path / "w" / "progress.json").read_text())["decoder"]["steps"] > 0
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("encoder.", "quant_conv", "bn.")))


def test_an_8x8_token_model_trains_exports_and_samples(tmp_path):
    """--vae-down 4: the same stages with 16x16 latents (8x8 image tokens); the result loads and samples."""
    from diffusers import Flux2KleinPipeline

    from dopsd_continual.toy.evaluate import decode_latents, final_latents
    from dopsd_continual.toy.model import MAX_SEQUENCE_LENGTH, TEXT_OUT_LAYERS, token_grid
    from dopsd_continual.toy.train import main

    main(["--stage", "all", "--vae-down", "4", "--loose", "0.3", "--budget", "vae=1", "--budget", "base=1",
          "--budget", "distill=1", "--workdir", str(tmp_path / "w"), "--device", "cpu", "--pool", "64",
          "--workers", "1", "--batch", "4", "--batch-vae", "4", "--batch-distill", "2", "--substeps", "1",
          "--out", str(tmp_path / "model"), "--scorer", str(tmp_path / "none")])
    pipe = Flux2KleinPipeline.from_pretrained(tmp_path / "model")
    assert token_grid(pipe.vae) == (8, 8)
    x = final_latents(pipe, pipe.transformer, ["a red circle", "a large blue square on the left, white background"], [0, 1], 4)
    assert x.shape == (2, 64, 128) and torch.isfinite(x).all()
    assert decode_latents(pipe, x).shape == (2, 3, 64, 64)
    img = pipe(prompt="a red circle", num_inference_steps=2, height=64, width=64, output_type="pt",
               text_encoder_out_layers=TEXT_OUT_LAYERS, max_sequence_length=MAX_SEQUENCE_LENGTH).images
    assert img.shape == (1, 3, 64, 64)


def test_warm_start_caption_dropout_and_a_guided_teacher(tmp_path):
    """--init-transformer starts the base from given weights; --uncond replaces that share of captions by the
    empty prompt; --guidance distils a guided teacher (both run through the real stages)."""
    from safetensors.torch import load_file

    from dopsd_continual.toy.train import batch_conditions, main

    common = ["--device", "cpu", "--pool", "64", "--workers", "1", "--batch", "4", "--batch-vae", "4",
              "--batch-distill", "2", "--substeps", "1", "--scorer", str(tmp_path / "none")]
    main(["--stage", "vae", "--budget", "vae=1", "--workdir", str(tmp_path / "a"), *common])
    main(["--stage", "base", "--budget", "base=1", "--uncond", "0.5", "--workdir", str(tmp_path / "a"), *common])
    src = tmp_path / "a" / "transformer_base.safetensors"
    (tmp_path / "b").mkdir()
    for f in ("vae.safetensors", "text_encoder.safetensors"):
        (tmp_path / "b" / f).write_bytes((tmp_path / "a" / f).read_bytes())
    main(["--stage", "base", "--budget", "base=0", "--init-transformer", str(src), "--workdir", str(tmp_path / "b"), *common])
    a, b = load_file(str(src)), load_file(str(tmp_path / "b" / "transformer_base.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    main(["--stage", "distill", "--budget", "distill=1", "--guidance", "2",
          "--workdir", str(tmp_path / "b"), *common])
    assert json.loads((tmp_path / "b" / "progress.json").read_text())["distill"]["steps"] > 0

    n, length, dim = 6, 5, 3
    ctx = {"device": torch.device("cpu"), "cap_idx": torch.arange(n), "text_ids": torch.zeros(1, length, 4),
           "grid": (2, 2), "emb_plain": torch.randn(n, length, dim), "emb_empty": torch.full((1, length, dim), 7.0)}
    for share, expect in ((0.0, 0), (1.0, n)):
        emb = batch_conditions({**ctx, "uncond": share}, torch.arange(n), with_ref=False)[0]
        assert int((emb == 7.0).all(dim=(1, 2)).sum()) == expect


def test_eval_stage_writes_the_model_card_table_with_guided_rows(tmp_path):
    """The eval stage end to end on a briefly trained model: every row of both held-out sets, guided base
    rows when --guidance is given, trajectory errors against the reference, the concept packs, a sheet."""
    from dopsd_continual.models import resolve_source
    from dopsd_continual.toy.train import main

    common = ["--workdir", str(tmp_path / "w"), "--device", "cpu", "--pool", "64", "--workers", "1", "--batch", "4",
              "--batch-vae", "4", "--batch-distill", "2", "--substeps", "1", "--scorer", str(resolve_source("embedded:toy-shapes"))]
    main(["--stage", "all", "--budget", "vae=1", "--budget", "base=1", "--budget", "distill=1",
          "--out", str(tmp_path / "model"), "--uncond", "0.5", "--guidance", "1.5", "--eval-ref-steps", "16",
          "--eval-prompts", "6", *common])
    table = json.loads((tmp_path / "w" / "eval.json").read_text())
    rows = {(r["model"], r["steps"]) for r in table["rows"]}
    assert {("base", 4), ("base", 32), ("base cfg 1.5", 4), ("distilled", 4), ("distilled", 1)} <= rows
    assert len(table["rows_loose"]) == len(table["rows"]) and table["held_out_prompts"] == 6
    assert all(0 <= r["overall"] <= 1 and r["trajectory_error"] > 0 and "trajectory_error_guided" in r for r in table["rows"])
    assert set(table["concepts"]["distilled"]) == {"heart", "striped", "logo"}
    assert (tmp_path / "w" / "samples.png").exists()
