import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("DOPSD_STABILITY_SECONDS", "0")
if "DOPSD_CACHE_DIR" not in os.environ:  # the memory accountant's counts: one temporary cache for the whole run
    import atexit
    import shutil
    import tempfile

    os.environ["DOPSD_CACHE_DIR"] = tempfile.mkdtemp(prefix="dopsd-test-cache-")
    atexit.register(shutil.rmtree, os.environ["DOPSD_CACHE_DIR"], ignore_errors=True)


@pytest.fixture
def watch(tmp_path) -> Path:
    d = tmp_path / "drop"
    d.mkdir()
    return d


@pytest.fixture
def state(tmp_path, watch):
    from dopsd_continual.store import init_state

    st = init_state(tmp_path / "state", None, [watch])
    yield st
    st.close()


def make_image(path: Path, size=(64, 64), mode="RGB", fmt=None, seed=0, **save_kw) -> Path:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    im = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        im = im.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format=fmt, **save_kw)
    return path


def make_pair(folder: Path, stem: str, caption: str = "a large red circle in the center, blue background", ext=".png", seed=None, **kw) -> Path:
    img = make_image(folder / f"{stem}{ext}", seed=hash(stem) % 2**31 if seed is None else seed, **kw)
    (folder / f"{stem}.txt").write_text(caption, encoding="utf-8")
    return img


def tree_snapshot(folder: Path) -> dict:
    """Every entry under folder with its bytes hash, size and mtime: the user's folder must not change."""
    import hashlib

    snap = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            snap[str(p)] = ("link", os.readlink(p))
        elif p.is_file():
            st = p.stat()
            snap[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_size, st.st_mtime_ns)
        else:
            snap[str(p)] = ("dir",)
    return snap


@pytest.fixture
def root(tmp_path):
    """A toy state with the heart pack ingested (its root folder): the dashboard's and the security tests' start."""
    from dopsd_continual.ingest import ingest_paths
    from dopsd_continual.store import init_state
    from dopsd_continual.toy.packs import write_pack

    write_pack("heart", tmp_path / "drop")
    st = init_state(tmp_path / "s", None, [tmp_path / "drop"])
    ingest_paths(st)
    st.close()
    return tmp_path / "s"
