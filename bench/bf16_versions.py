"""What the gate and `dopsd sample` see of a version on a bf16 base, against the exact float32 stack.

On the toy model with its transformer in bf16 (CPU): a chain of rounds is trained at the real klein recipe's
lr 2e-5 (float32 adapters under the bf16 base, each round on top of the last, as rounds run). Each way of
setting a version is then sampled (the same prompts, seeds and few-step Euler loop as the gate) and set
beside the exact stack, the base's own bf16 values plus every delta of the chain in float32 (what peft and
diffusers compute for an exported LoRA), twice: in bf16 compute (what the gate and `dopsd sample` run) and
in float32 compute (the version's weights alone, without bf16's activation rounding). Reported per way and
depth: mean |latent difference| from the exact stack as a share of the chain's own effect (mean |exact -
bare base|); then the sampling seconds against the bare base, and the bytes a way adds. The ways:
  - merge_rtn: base + deltas rounded once to bf16 (what versions were before; ComfyUI and peft merge so);
  - merge_stochastic: the same sum stochastically rounded to bf16 (unbiased; seeded per layer);
  - unmerged: the chain's factors stacked, held in bf16, applied beside the bf16 base (WeightSwitcher);
  - unmerged_rank_K: the same squashed to its leading K singular directions (WeightSwitcher past max_rank);
  - peft_adapter (depth 1, bf16 compute): the same delta as a float32 peft adapter, an independent exact
    implementation: its difference is the floor that bf16 compute itself sets between equal versions.
Then the term's share of a real-size klein-4B forward's multiply-adds at depth 1, 5 and 20 (rank 64, the
recipe's targets, squashed at 256), counted from the module tree on `meta`.
Writes bench/results/bf16_versions.json. --depths and --steps shorten it (tests run it tiny).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from benchinfo import machine  # noqa: E402

from dopsd_continual.families import klein  # noqa: E402
from dopsd_continual.families.klein import KleinBackend  # noqa: E402
from dopsd_continual.models import load_pipeline  # noqa: E402
from dopsd_continual.recipe import load_recipe, resolve_recipe_path  # noqa: E402
from dopsd_continual.stack import WeightSwitcher  # noqa: E402
from dopsd_continual.toy.packs import PACKS, pack_images  # noqa: E402
from dopsd_continual.training import train_delta  # noqa: E402

PACK_ORDER = ["heart", "striped", "logo"]


def stochastic_round(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """float32 -> bf16, rounding up with probability equal to the dropped fraction (unbiased)."""
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, generator=gen, dtype=torch.int32)
    return ((bits + noise) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", default="1,5")
    ap.add_argument("--cost-depths", default="1,5,20")
    ap.add_argument("--steps", type=int, default=60, help="optimiser steps per round")
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--ranks", default="8,16,32", help="squash ranks reported")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "bf16_versions.json"))
    a = ap.parse_args()
    depths = [int(x) for x in a.depths.split(",")]
    torch.manual_seed(0)
    recipe = load_recipe(resolve_recipe_path(None))
    pipe = load_pipeline(recipe, "cpu")
    tr = pipe.transformer.to(torch.bfloat16)
    backend = KleinBackend(pipe, recipe)
    modules = dict(tr.named_modules())
    prompts = [s.caption() for p in PACKS for s in PACKS[p].eval][:: max(1, 24 // a.prompts)][: a.prompts]
    emb = backend.encode(prompts).to(torch.bfloat16)
    b = len(prompts)
    ids = (backend.text_ids(b, emb.shape[1]), klein.latent_ids(b, backend.grid, "cpu"))
    noise = torch.randn(b, backend.grid[0] * backend.grid[1], 128, generator=torch.Generator().manual_seed(0))
    sigmas = backend.sigmas(recipe["model"]["steps"])

    def draw() -> torch.Tensor:
        return klein.euler_sample(tr, noise, sigmas, emb, *ids).float()

    # a chain of rounds, each trained on top of the exact (unmerged) chain before it
    train = dict(recipe["train"], lr=a.lr, steps=a.steps)
    sw = WeightSwitcher(tr, mode="unmerged", max_rank=10**9)
    deltas, t0 = [], time.time()
    for i in range(max(depths)):
        pack = PACK_ORDER[i % len(PACK_ORDER)]
        imgs = torch.from_numpy(pack_images(pack)).permute(0, 3, 1, 2).float() / 255
        sw.apply(deltas)
        feats = [backend.features(s.caption(), imgs[j]) for j, s in enumerate(PACKS[pack].train)]
        deltas.append(train_delta(backend, feats, [], dict(train, seed=i), "dopsd").delta)
        print(f"round {i + 1}: {time.time() - t0:.0f} s", flush=True)
    sw.apply([])
    names = sorted({n for d in deltas for n in d.weights})
    base = {n: modules[n].weight.detach().clone() for n in names}
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "model": "toy-shapes, transformer in bf16 (CPU)", "lr": a.lr, "steps_per_round": a.steps,
              "delta_rank": deltas[0].rank, "prompts": b, "by_depth": {}, "cost": {}}
    ranks = [int(r) for r in a.ranks.split(",")]

    def set_weights(fn):
        with torch.no_grad():
            for n in names:
                modules[n].weight.copy_(fn(n))

    def restore():
        set_weights(lambda n: base[n])

    for depth in depths:
        chain = deltas[:depth]

        def exact_sum(n, chain=chain):
            w = base[n].float().clone()
            for d in chain:
                if n in d.weights:
                    w += d.product(n)
            return w

        ways = {"merge_rtn": lambda n: exact_sum(n).to(torch.bfloat16)}
        gen = torch.Generator().manual_seed(0)
        ways["merge_stochastic"] = lambda n, gen=gen: stochastic_round(exact_sum(n), gen)
        squashes = [(f"unmerged_rank_{r}", r) for r in ranks if r < depth * chain[0].rank]
        row = {}
        for compute in ("bf16", "float32"):
            # the reference: the base's own (bf16) values plus every delta of the chain in float32, unmerged:
            # what peft and diffusers compute for an exported LoRA; in float32 compute, the merged float32 sum
            dtype = torch.bfloat16 if compute == "bf16" else torch.float32
            tr.to(dtype)
            restore()
            ref = WeightSwitcher(tr, mode="unmerged", max_rank=10**9, factor_dtype=torch.float32)
            ref.apply(chain)
            x_ref = klein.euler_sample(tr, noise.to(dtype), sigmas, emb.to(dtype), *ids).float()
            ref.apply([])
            x_bare = klein.euler_sample(tr, noise.to(dtype), sigmas, emb.to(dtype), *ids).float()
            effect = float((x_ref - x_bare).abs().mean())
            out = {"chain_effect": effect, "ways": {}}

            def record(way, x, x_ref=x_ref, out=out, effect=effect, depth=depth, compute=compute):
                err = float((x - x_ref).abs().mean())
                out["ways"][way] = {"latent_error": err, "share_of_effect": err / effect}
                print(f"depth {depth}, {compute} compute, {way}: {err / effect:.1%} of the chain's effect", flush=True)

            for way, fn in ways.items():
                set_weights(lambda n: fn(n).to(dtype))  # noqa: B023
                record(way, klein.euler_sample(tr, noise.to(dtype), sigmas, emb.to(dtype), *ids).float())
                restore()
            if compute == "bf16" and depth == 1:  # an independent reference: the delta as a float32 peft adapter
                record("peft_adapter", _peft(tr, chain[0], lambda: draw()))
            for way, k in [("unmerged", 10**9)] + squashes:  # the product's way: factors held in bf16
                sq = WeightSwitcher(tr, mode="unmerged", max_rank=k, factor_dtype=torch.bfloat16)
                sq.apply(chain)
                record(way, klein.euler_sample(tr, noise.to(dtype), sigmas, emb.to(dtype), *ids).float())
                sq.apply([])
            row[compute] = out
        tr.to(torch.bfloat16)
        restore()
        result["by_depth"][str(depth)] = row
        Path(a.out).write_text(json.dumps(result, indent=2))

    # sampling cost: the bare base against each version's unmerged term, at depth 1, 5 and 20 (factors of
    # the trained rounds repeated: the cost depends on the stacked rank, not on the values)
    def timed() -> float:
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            draw()
            best = min(best, time.perf_counter() - t)
        return best

    result["cost"]["bare_s"] = timed()
    for depth in [int(x) for x in a.cost_depths.split(",")]:
        chain = [deltas[i % len(deltas)] for i in range(depth)]
        row = {}
        for way, k in (("unmerged", 10**9), ("unmerged_rank_32", 32)):
            s = WeightSwitcher(tr, mode="unmerged", max_rank=k)
            t = time.perf_counter()
            s.apply(chain)
            switch_s = time.perf_counter() - t
            term = sum(m._buffers["chain_A"].numel() + m._buffers["chain_B"].numel() for n, m in modules.items()
                       if "chain_A" in m._buffers)
            row[way] = {"sample_s": timed(), "switch_s": switch_s, "term_bytes": term * 4,
                        "base_bytes": sum(p.numel() * p.element_size() for p in tr.parameters())}
            s.apply([])
        result["cost"][str(depth)] = row
        print(f"cost depth {depth}: bare {result['cost']['bare_s']:.3f} s, " + ", ".join(
            f"{w} {r['sample_s']:.3f} s" for w, r in row.items()), flush=True)
        Path(a.out).write_text(json.dumps(result, indent=2))
    result["real_size_klein_term_share"] = klein_term_share()
    print("real-size klein-4B term share of a forward's multiply-adds:", result["real_size_klein_term_share"], flush=True)
    Path(a.out).write_text(json.dumps(result, indent=2))


def klein_term_share() -> dict:
    """Multiply-adds per image token of the chain's term over the transformer's Linear layers (real-size
    klein-4B on `meta`, the recipe's targets at rank 64, squashed at 4x the rank)."""
    from dopsd_continual import memory
    from dopsd_continual.lora import resolve_targets
    from dopsd_continual.recipe import RECIPES_DIR
    from dopsd_continual.stack import CHAIN_RANK_FACTOR

    recipe = load_recipe(RECIPES_DIR / "flux2-klein-4b.toml")
    tr = memory.meta_modules(recipe, ("transformer",))["transformer"]
    mods = dict(tr.named_modules())
    base = sum(m.in_features * m.out_features for m in mods.values() if isinstance(m, torch.nn.Linear))
    names = resolve_targets(tr, recipe["train"]["targets"])
    per_rank = sum(mods[n].in_features + mods[n].out_features for n in names)
    r = int(recipe["train"]["rank"])
    return {str(d): per_rank * min(d * r, CHAIN_RANK_FACTOR * r) / base for d in (1, 5, 20)}


def _peft(transformer, delta, draw):
    """The delta as a float32 peft adapter on the bf16 base (peft's own unmerged path)."""
    from peft import LoraConfig

    r = delta.rank
    cfg = LoraConfig(r=r, lora_alpha=delta.scale * r, target_modules=sorted(delta.weights))
    transformer.add_adapter(cfg, adapter_name="exact")
    with torch.no_grad():
        for n, (a, b) in delta.weights.items():
            mod = dict(transformer.named_modules())[n]
            mod.lora_A["exact"].weight.data = a.float().clone()
            mod.lora_B["exact"].weight.data = b.float().clone()
    try:
        return draw()
    finally:
        transformer.unload_lora()


if __name__ == "__main__":
    main()
