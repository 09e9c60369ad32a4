"""The gate on real rounds of the toy model: a default D-OPSD round is accepted, a damaging one rejected."""

import json

from dopsd_continual.ingest import ingest_paths
from dopsd_continual.rounds import run_round
from dopsd_continual.sampling import Sampler
from dopsd_continual.stack import set_active
from dopsd_continual.store import init_state
from dopsd_continual.toy.packs import write_pack


def test_default_dopsd_accepted_and_damaging_sft_rejected(tmp_path):
    write_pack("heart", tmp_path / "drop")
    st = init_state(tmp_path / "s", None, [tmp_path / "drop"])
    ingest_paths(st)
    sampler = Sampler(st)
    good = run_round(st, sampler=sampler)
    assert good["verdict"] == "accepted", good["reasons"]
    assert st.active_version == good["version"]
    set_active(st, "v0")
    for row in list(st.db["samples"].rows):
        st.db["samples"].update(row["id"], {"status": "queued"})
    bad = run_round(st, objective="sft", lr=3e-3, steps=150, sampler=sampler)
    assert bad["verdict"] == "rejected"
    assert any("reference-conditioned teacher" in r for r in bad["reasons"])
    assert st.active_version == "v0"  # active unchanged
    assert st.db["versions"].get(bad["version"])["status"] == "rejected"
    report = json.loads((st.reports / f"{bad['version']}.json").read_text())
    assert report["verdict"] == "rejected" and report["reasons"] == bad["reasons"] and "thresholds" in report
    assert (st.reports / f"{bad['version']}.png").exists()
    # samples used only by the rejected round go back to the queue, with the rejection counted
    rows = list(st.db["samples"].rows)
    assert all(r["status"] == "queued" and r["rejections"] == 1 for r in rows)
    st.close()
