"""A real model without (all of) its weights: doctor says which part and the command that gets it; a round
fails in one line before it leaves anything behind; the daemon says it once and holds."""

import re
import shutil

from test_daemon import count, fast_recipe
from test_robustness import cli

from dopsd_continual.daemon import Daemon
from dopsd_continual.ingest import ingest_paths
from dopsd_continual.models import missing_weights
from dopsd_continual.recipe import RECIPES_DIR
from dopsd_continual.store import init_state
from dopsd_continual.toy.packs import write_pack


def _state_without_vae_weights(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(RECIPES_DIR.parent / "dopsd_continual" / "toy" / "model", model)
    for f in (model / "vae").glob("*.safetensors"):
        f.unlink()  # a download that stopped part way
    recipe = fast_recipe(tmp_path, min_new_samples=1)
    recipe.write_text(re.sub(r'(?m)^source = .*$', f'source = "{model}"', recipe.read_text(), count=1))
    write_pack("heart", tmp_path / "drop")
    st = init_state(tmp_path / "s", str(recipe), [tmp_path / "drop"])
    ingest_paths(st)
    return st


def test_doctor_train_and_the_daemon_name_the_missing_part(tmp_path):
    st = _state_without_vae_weights(tmp_path)
    assert missing_weights(st.recipe) == ["vae: no weights"]
    r = cli("doctor", "--state", st.root)
    assert r.returncode == 1 and "vae: no weights" in r.stdout and "local folder is incomplete" in r.stdout
    r = cli("train", "--state", st.root)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "vae: no weights" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert count(st.root, "versions") == 1  # nothing left behind: no interrupted version
    assert count(st.root, "samples where status = 'queued'") == 8
    d = Daemon(st.root, install_signals=False)
    assert d.round_job("schedule") is None and "vae: no weights" in d.held["reason"]
    d.state.close()
    st.close()


def test_a_hugging_face_id_not_in_the_cache_says_pull(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    st = init_state(tmp_path / "s", "flux2-klein-4b", [])
    r = cli("doctor", "--state", st.root, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert "black-forest-labs/FLUX.2-klein-4B: not downloaded" in r.stdout and "dopsd pull" in r.stdout
    r = cli("pull", "--state", st.root, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 1 and "HF_HUB_OFFLINE" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    st.close()


def test_init_creates_a_missing_watched_folder_and_says_what_a_real_recipe_needs(tmp_path):
    r = cli("init", "--recipe", "flux2-klein-4b", "--watch", tmp_path / "new" / "drop", "--state", tmp_path / "s",
            env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "new" / "drop").is_dir() and "created the watched folder" in r.stdout
    assert "needs: the weights of flux2-klein-4b" in r.stdout and "16 GB card" in r.stdout
