"""The GPU benchmark's code runs end to end on tiny configs (the dry run the CPU can do)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_round_dry_run_on_tiny_configs(tmp_path):
    out = tmp_path / "gpu_round.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_round.py"), "--tiny", "--steps", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    for name in ("flux2-klein-4b", "z-image-turbo"):
        row = res["models"][name]
        assert row["baseline_step_s"] > 0 and row["dopsd_step_s"] > 0
        assert 0 <= row["dopsd_checkpointing_share"] <= 1
        for share in ("1", "0.75", "0.5", "0.25", "0"):
            assert row[f"dopsd_ckpt_{share}_step_s"] > 0
        for share in ("1", "0.5", "0"):
            assert row[f"int8_ckpt_{share}_step_s"] > 0
        assert row["int8_step_s"] > 0
    assert res["models"]["z-image-turbo"]["teacher_context_tokens"] > 16  # image tokens + text


def test_recipe_sweep_picks_the_cheapest_setting_within_the_retention_limit_and_90_percent_of_the_best_gain():
    sys.path.insert(0, str(ROOT / "bench"))
    from recipe_sweep import REFERENCE_STEPS, summarise

    none = [{"concept": c, "seed": 0, "concept_fidelity": 0.5, "retention": 0.8} for c in ("heart", "striped", "logo")]

    def rows(variant, steps, k, gain, drop, seconds):
        return [{"variant": variant, "concept": c, "seed": 0, "steps": steps, "K": k, "lr": 1e-3, "rank": 8,
                 "seconds": seconds, "concept_fidelity": 0.5 + gain, "retention": 0.8 - drop} for c in ("heart", "striped", "logo")]

    out = {"none": none, "rows": [
        *rows("default", REFERENCE_STEPS, 4, 0.10, 0.04, 50),   # best gain within the limit
        *rows("default", 300, 4, 0.20, 0.08, 100),              # more gain, too much forgetting: not admissible
        *rows("K 2", 100, 2, 0.091, 0.03, 20),                  # 91%: good, 200 passes
        *rows("K 2", 50, 2, 0.089, 0.02, 10),                   # 89%: not good, though cheaper
        *rows("lr x2", 50, 4, 0.095, 0.03, 25),                 # good, 200 passes too, but slower: the tie-break
    ]}
    sm = summarise(out)
    assert sm["best_gain"] == pytest.approx(0.10)
    assert (sm["cheapest_good"]["variant"], sm["cheapest_good"]["steps"]) == ("K 2", 100)
    assert sm["default"]["steps"] == REFERENCE_STEPS


def test_gpu_e2e_runs_the_product_on_tiny_configs(tmp_path):
    """The real-size benchmark's code path, end to end: weights written, every `dopsd` command run, phases kept."""
    out = tmp_path / "gpu_e2e.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_e2e.py"), "--tiny", "--short-gate", "--steps", "2", "--work", str(tmp_path / "w"),
         "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    for name in ("flux2-klein-4b", "z-image-turbo"):
        row = res["models"][name]
        assert "error" not in row, row
        assert all(c["ok"] for c in row["commands"].values()), row["commands"]
        assert row["queued"] == 2 and row["round"]["verdict"] in ("accepted", "rejected")
        assert set(row["round"]["phases"]) == {"load", "features", "train", "gate"}
        assert set(row["sample"]["phases"]) == {"load", "sample"}
        assert (tmp_path / "w" / name / "export-comfyui" / "lora_comfyui.safetensors").exists()
        assert (tmp_path / "w" / name / "sample.png").exists()


def test_memory_plan_reports_the_accountant_beside_every_measured_peak(tmp_path):
    """bench/memory_plan.py: the product's accountant against the card's measurements, and each shipped recipe's plan per card."""
    out = tmp_path / "plan.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "memory_plan.py"), "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    plan = json.loads(out.read_text())
    for name in ("flux2-klein-4b", "z-image-turbo", "flux2-klein-9b"):
        row = plan["models"][name]
        assert set(row["plans"]) == {"16gb", "24gb", "48gb"}
        assert row["plans"]["48gb"]["fits"]
    assert plan["models"]["flux2-klein-4b"]["plans"]["16gb"]["fits"]
    assert plan["models"]["z-image-turbo"]["plans"]["24gb"]["fits"]
    assert plan["models"]["flux2-klein-4b"]["max_abs_error"] <= 0.15
    assert plan["models"]["z-image-turbo"]["components_gib"]["teacher_encoder"] > 8


def test_gate_zoo_labels_calibrates_and_counts_on_a_small_case():
    sys.path.insert(0, str(ROOT / "bench"))
    import gate_zoo as z

    parent = {"retention": 0.80, "sharpness": 1.0, "diversity": 0.10, "concept": 0.50}
    assert z.label({**parent, "retention": 0.70}, parent)[0] == "harmful"  # retention fell by 0.10 > 0.05
    assert z.label({**parent, "sharpness": 0.80}, parent)[0] == "harmful"  # blur
    assert z.label({**parent, "diversity": 0.06}, parent)[0] == "harmful"  # collapse
    assert z.label({**parent, "concept": 0.55}, parent)[0] == "useful"
    assert z.label({**parent, "retention": 0.77, "concept": 0.51}, parent)[0] == "neutral"
    near = {**parent, "neighbours": 0.80}
    assert z.label({**near, "neighbours": 0.70, "concept": 0.55}, near)[0] == "harmful"  # it leaks into neighbours
    assert z.label({**near, "neighbours": 0.78, "concept": 0.55}, near)[0] == "useful"

    def row(kind, seed, lab, **guards):
        return {"kind": kind, "seed": seed, "split": "calibration" if seed < 3 else "held_out", "label": lab,
                "guards": {"drift": 0.01, "sharpness_ratio": 1.0, **guards}}

    rows = [row("default", 0, "useful", drift=0.010), row("default", 1, "useful", drift=0.014),
            row("noise_pack", 0, "harmful", drift=0.200), row("blurred", 1, "harmful", drift=0.012, sharpness_ratio=0.5),
            row("default", 3, "useful", drift=0.012), row("noise_pack", 3, "harmful", drift=0.300),
            row("lr_x30", 4, "harmful", drift=0.013, sharpness_ratio=0.95)]
    t = z.calibrate(rows, ["drift", "sharpness_ratio", "colour_shift"])
    assert set(t) == {"drift", "sharpness_ratio"}  # colour_shift has no values: dropped
    assert 0.014 < t["drift"] < 0.2 and 0.5 < t["sharpness_ratio"] < 1.0
    for r in rows:
        r["verdict"] = z.verdict(r, t)[0]
    held = z.confusion([r for r in rows if r["split"] == "held_out"], "verdict")
    assert (held["harmful"], held["useful"], held["false_accepts"], held["false_rejects"]) == (2, 1, 1, 0)
    assert held["gross_harmful_accepted"] == 1 and held["by_kind"]["lr_x30"] == {"harmful/accepted": 1}
