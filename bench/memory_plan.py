"""GPU memory per phase of the default real-model recipes, planned without a GPU.

Resident bytes come from the real-size architectures built on the `meta` device (no weights): each
component's parameters and buffers in the recipe's dtype, and the round's LoRA training state in float32
(student and EMA teacher adapters, gradients, AdamW's two moments: 5 x 4 bytes a LoRA parameter).
What a phase holds follows `dopsd_continual.placement.PHASES`. Activations are not arithmetic: each phase's
figure is its measured peak in bench/results/gpu_e2e.json (the product's own run, 1024 px, batch 1) minus
the resident bytes planned here for that phase, and is written down beside the plan. With
`train.base_weights = "int8"` the train phase holds the transformer's Linear weights in 1 byte (plus a
float32 scale per output channel).

Writes bench/results/memory_plan.json: {"models": {NAME: {"phases": {PHASE: gib}, "peak_gib", "budget_gib",
"fits_16gb", ...}}}. tests/test_bench.py fails if a default recipe's planned peak exceeds 22 GiB.
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

from gpu_e2e import klein_modules, zimage_modules  # noqa: E402

from dopsd_continual.lora import resolve_targets  # noqa: E402
from dopsd_continual.placement import PHASES  # noqa: E402
from dopsd_continual.recipe import RECIPES_DIR, load_recipe  # noqa: E402

BUDGET_GIB = 22.0
CARD_16GB_GIB = 14.5  # what a 16 GB card leaves a process after the driver, the CUDA context and the desktop
GIB = 2**30
E2E = REPO / "bench" / "results" / "gpu_e2e.json"
MEASURED_PHASE = {"features": "features", "train": "train", "gate": "gate", "sample": "sample"}


def module_bytes(module: torch.nn.Module, dtype_bytes: int) -> int:
    return sum(t.numel() for t in list(module.parameters()) + list(module.buffers())) * dtype_bytes


def int8_bytes(transformer: torch.nn.Module, dtype_bytes: int) -> int:
    """The transformer with its Linear weights in int8 and a float32 scale per output row."""
    total = module_bytes(transformer, dtype_bytes)
    for m in transformer.modules():
        if isinstance(m, torch.nn.Linear):
            total -= m.weight.numel() * (dtype_bytes - 1)
            total += m.weight.shape[0] * 4
    return total


def lora_params(transformer: torch.nn.Module, targets: list[str], rank: int) -> int:
    modules = dict(transformer.named_modules())
    return sum(rank * (modules[n].in_features + modules[n].out_features) for n in resolve_targets(transformer, targets))


def plan_model(name: str, parts: dict, recipe: dict, measured: dict | None) -> dict:
    dtype_bytes = torch.finfo(getattr(torch, recipe["model"]["dtype"])).bits // 8
    sizes = {k: module_bytes(m, dtype_bytes) / GIB for k, m in parts.items()}
    train = recipe["train"]
    n_lora = lora_params(parts["transformer"], train["targets"], train["rank"])
    adapters = n_lora * 4 * 5 / GIB
    resident = {
        "features": sum(sizes[k] for k in (*PHASES["features"], "teacher_encoder") if k in sizes),
        "train": sizes["transformer"] + adapters,
        "gate": sum(sizes[k] for k in PHASES["sample"]),
        "sample": sum(sizes[k] for k in PHASES["sample"]),
    }
    activation, source = {}, {}
    for phase in resident:
        peak = (measured or {}).get(phase)
        activation[phase] = max(0.0, peak - resident[phase]) if peak is not None else None
        source[phase] = "measured" if peak is not None else "not measured"
    phases = {p: resident[p] + (activation[p] or 0.0) for p in resident}
    int8_train = int8_bytes(parts["transformer"], dtype_bytes) / GIB + adapters + (activation["train"] or 0.0)
    peak = max(phases.values())
    return {
        "components_gib": sizes,
        "lora_parameters": n_lora,
        "adapter_training_state_gib": adapters,
        "resident_gib": resident,
        "activation_gib": activation,
        "activation_source": source,
        "phases": phases,
        "peak_phase": max(phases, key=phases.get),
        "peak_gib": peak,
        "budget_gib": BUDGET_GIB,
        "train_with_int8_base_gib": int8_train,
        "fits_16gb": peak <= CARD_16GB_GIB,
    }


def measured_peaks(e2e: dict, name: str) -> dict | None:
    row = e2e.get("models", {}).get(name, {})
    if "round" not in row:
        return None
    out = {p: r["peak_gib"] for p, r in row["round"]["phases"].items() if r.get("peak_gib") is not None}
    sample = row.get("sample", {}).get("phases", {}).get("sample", {})
    if sample.get("peak_gib") is not None:
        out["sample"] = sample["peak_gib"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "memory_plan.json"))
    a = ap.parse_args()
    e2e = json.loads(E2E.read_text()) if E2E.exists() else {}
    result = {"date": time.strftime("%Y-%m-%d"), "resolution": 1024, "batch": 1,
              "activations_from": f"{E2E.relative_to(REPO)} ({e2e.get('device', '?')}, {e2e.get('date', '?')})",
              "card_16gb_usable_gib": CARD_16GB_GIB, "models": {}}
    for name, build in (("flux2-klein-4b", klein_modules), ("z-image-turbo", zimage_modules)):
        recipe = load_recipe(RECIPES_DIR / f"{name}.toml")
        result["models"][name] = plan_model(name, build(False, "meta"), recipe, measured_peaks(e2e, name))
    Path(a.out).write_text(json.dumps(result, indent=2))
    for name, row in result["models"].items():
        print(f"{name}: peak {row['peak_gib']:.1f} GiB in {row['peak_phase']} "
              + ", ".join(f"{p} {g:.1f}" for p, g in row["phases"].items()))


if __name__ == "__main__":
    main()
