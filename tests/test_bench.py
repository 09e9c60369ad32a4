"""The GPU benchmark's code runs end to end on tiny configs (the dry run the CPU can do)."""

import json
import subprocess
import sys
from pathlib import Path

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
    assert res["models"]["z-image-turbo"]["teacher_context_tokens"] > 16  # image tokens + text
