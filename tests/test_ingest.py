import io
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image, make_pair, tree_snapshot
from PIL import Image

from dopsd_continual.ingest import ingest_paths, load_rgb_bytes, sample_image


def paths(entries):
    return sorted(os.path.basename(e["path"]) for e in entries)


def reasons(report):
    return {os.path.basename(r["path"]): r["reason"] for r in report.rejected}


def test_pair_is_copied_into_blobs_and_queued(state, watch):
    make_pair(watch, "a", "a small yellow square on the left, black background")
    rep = ingest_paths(state)
    assert paths(rep.queued) == ["a.png"]
    row = next(state.db["samples"].rows)
    assert row["status"] == "queued" and row["caption"] == "a small yellow square on the left, black background"
    blob = state.root / row["image_blob"]
    assert blob.read_bytes() == (watch / "a.png").read_bytes()
    assert (state.root / row["caption_blob"]).exists()


def test_extensions_any_case_and_recursive(state, watch):
    make_pair(watch / "sub" / "deeper", "x", ext=".PNG", fmt="PNG")
    make_pair(watch, "y", ext=".JPeG", fmt="JPEG")
    make_pair(watch, "z", ext=".webp", fmt="WEBP")
    assert paths(ingest_paths(state).queued) == ["x.PNG", "y.JPeG", "z.webp"]


def _bomb_png(path, w=50000, h=50000):
    """A valid PNG header claiming w x h pixels with almost no data: must be refused from the header."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b""))


def _truncated(path):
    make_image(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _animated(path):
    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    frames[0].save(path, format="WEBP", save_all=True, append_images=frames[1:], duration=100)


@pytest.mark.parametrize(
    "name, setup, reason",
    [
        ("zero.png", lambda p: p.write_bytes(b""), "empty file"),
        ("trunc.png", _truncated, "truncated"),
        ("text.png", lambda p: p.write_text("hello, not a picture"), "not an image"),
        ("mismatch.png", lambda p: make_image(p, fmt="JPEG"), "file is JPEG but its extension says PNG"),
        ("bomb.png", _bomb_png, "too large"),
        ("tiny.png", lambda p: make_image(p, size=(31, 64)), "too small"),
    ],
)
def test_image_rejections_have_reasons(state, watch, name, setup, reason, monkeypatch):
    import dopsd_continual.ingest as ingest_mod

    decoded = []
    real = ingest_mod.load_rgb_bytes
    monkeypatch.setattr(ingest_mod, "load_rgb_bytes", lambda data: decoded.append(1) or real(data))
    setup(watch / name)
    (watch / name).with_suffix(".txt").write_text("a caption")
    rep = ingest_paths(state)
    assert reason in reasons(rep)[name]
    assert not rep.queued
    if name == "bomb.png":
        assert not decoded  # refused from its header, never decoded
    row = state.db["files"].get(str(watch / name))
    assert row["outcome"] == "rejected" and reason in row["reason"]


@pytest.mark.parametrize(
    "caption_bytes, reason",
    [
        (None, "missing caption"),
        (b"   \n", "empty caption"),
        (b"x" * 4001, "caption too long"),
        (b"\xff\xfe\xfa not utf8", "not UTF-8"),
    ],
)
def test_caption_rejections(state, watch, caption_bytes, reason):
    make_image(watch / "a.png")
    if caption_bytes is not None:
        (watch / "a.txt").write_bytes(caption_bytes)
    assert reason in reasons(ingest_paths(state))["a.png"]


def test_bom_caption_is_fine_and_trigger_is_replaced(state, watch):
    make_image(watch / "a.png")
    (watch / "a.txt").write_bytes("\ufeffmy [trigger] logo, blue background".encode("utf-8"))
    rep = ingest_paths(state)
    assert rep.queued[0]["caption"] == "my zxq logo, blue background"


def test_default_caption_from_recipe(tmp_path, watch):
    from dopsd_continual.store import init_state

    recipe = tmp_path / "r.toml"
    recipe.write_text(
        (os.path.dirname(__file__) + "/../recipes/toy-shapes.toml").replace("", "")
        and open(os.path.dirname(__file__) + "/../recipes/toy-shapes.toml").read().replace(
            '# default_caption = "a photo"', 'default_caption = "a photo"'
        )
    )
    st = init_state(tmp_path / "s2", str(recipe), [watch])
    make_image(watch / "a.png")
    assert ingest_paths(st).queued[0]["caption"] == "a photo"
    st.close()


def test_two_images_one_caption_stem_are_rejected(state, watch):
    make_image(watch / "a.png", seed=1)
    make_image(watch / "a.jpg", fmt="JPEG", seed=2)
    (watch / "a.txt").write_text("a caption")
    r = reasons(ingest_paths(state))
    assert "share the caption" in r["a.png"] and "share the caption" in r["a.jpg"]


@pytest.mark.parametrize("mode", ["CMYK", "P", "RGBA", "L", "I;16", "LA"])
def test_modes_convert_to_rgb(state, watch, mode):
    ext, fmt = (".jpg", "JPEG") if mode == "CMYK" else (".png", "PNG")
    path = watch / f"m{ext}"
    if mode == "I;16":
        Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(path)
    else:
        make_image(path, mode=mode, fmt=fmt)
    (watch / "m.txt").write_text("caption")
    rep = ingest_paths(state)
    assert paths(rep.queued) == [f"m{ext}"], rep.rejected
    row = next(state.db["samples"].rows)
    im = sample_image(state, row)
    assert im.mode == "RGB" and im.size == (64, 64)
    if mode == "I;16":
        assert np.asarray(im).max() > 200  # scaled from 16 bits, not clipped to white or black


def test_exif_orientation_is_applied(state, watch):
    im = Image.new("RGB", (80, 40), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    im.save(watch / "o.jpg", exif=exif.tobytes())
    (watch / "o.txt").write_text("caption")
    ingest_paths(state)
    assert sample_image(state, next(state.db["samples"].rows)).size == (40, 80)


def test_ignored_files_are_silent_and_symlinks_out_are_listed(state, watch, tmp_path):
    for name in (".DS_Store", "._a.png", "Thumbs.db", "desktop.ini", "b.png.part", "c.crdownload", "d.tmp", "~e.png"):
        (watch / name).write_bytes(b"junk")
    (watch / "@eaDir").mkdir()
    make_pair(watch / "@eaDir", "thumb")
    (watch / "__MACOSX").mkdir()
    make_pair(watch / "__MACOSX", "mac")
    outside = make_pair(tmp_path / "outside", "secret")
    (watch / "link.png").symlink_to(outside)
    (watch / "linkdir").symlink_to(tmp_path / "outside")
    make_pair(watch, "real")
    (watch / "inside.png").symlink_to(watch / "real.png")
    (watch / "inside.txt").write_text("another caption")
    rep = ingest_paths(state)
    # a link inside the folder is followed: same bytes as real.png, so one is queued and one is a duplicate
    assert sorted(paths(rep.queued) + paths(rep.duplicates)) == ["inside.png", "real.png"]
    assert len(rep.queued) == 1
    ign = {os.path.basename(i["path"]): i["reason"] for i in rep.ignored}
    assert ign == {"link.png": "symlink leaves the watched folder", "linkdir": "symlink leaves the watched folder"}
    assert not rep.rejected


def test_unsupported_and_orphan_caption_are_listed(state, watch):
    (watch / "notes.md").write_text("hi")
    (watch / "lonely.txt").write_text("no image")
    ign = {os.path.basename(i["path"]): i["reason"] for i in ingest_paths(state).ignored}
    assert "unsupported" in ign["notes.md"] and "without an image" in ign["lonely.txt"]


def test_metadata_jsonl(state, watch):
    make_image(watch / "one.png", seed=1)
    make_image(watch / "two.png", seed=2)
    (watch / "metadata.jsonl").write_text(
        json.dumps({"file_name": "one.png", "text": "a small red circle at the top, white background"}) + "\n"
        + json.dumps({"file_name": "two.png", "text": "a large blue square at the bottom, black background"}) + "\n"
        + "{not json}\n"
    )
    rep = ingest_paths(state)
    caps = {os.path.basename(q["path"]): q["caption"] for q in rep.queued}
    assert caps == {"one.png": "a small red circle at the top, white background",
                    "two.png": "a large blue square at the bottom, black background"}
    assert any("metadata.jsonl:3" in r["path"] for r in rep.rejected)


def test_stability_wait(state, watch, monkeypatch):
    monkeypatch.setenv("DOPSD_STABILITY_SECONDS", "3600")  # written just now: still changing for an hour
    make_pair(watch, "fresh")
    rep = ingest_paths(state)
    assert paths(rep.pending) == ["fresh.png"] and not rep.queued
    monkeypatch.setenv("DOPSD_STABILITY_SECONDS", "0")  # the same file once it has been still long enough
    assert paths(ingest_paths(state).queued) == ["fresh.png"]


def test_idempotent_and_user_folder_untouched(state, watch):
    for i in range(5):
        make_pair(watch, f"p{i}")
    (watch / "bad.png").write_bytes(b"")
    (watch / "bad.txt").write_text("x")
    before = tree_snapshot(watch)
    first = ingest_paths(state)
    rows1 = list(state.db["samples"].rows)
    second = ingest_paths(state)
    assert len(first.queued) == 5 and not second.queued
    assert not second.duplicates and not second.rejected  # reported once, when they were new
    assert sorted(paths(second.unchanged)) == sorted(paths(first.queued) + paths(first.rejected))
    assert {r["outcome"] for r in second.unchanged if r["path"].endswith("bad.png")} == {"rejected"}
    assert list(state.db["samples"].rows) == rows1
    assert tree_snapshot(watch) == before


def test_the_daemons_rescan_counts_unchanged_files_and_lists_only_the_rejected(state, watch):
    for i in range(4):
        make_pair(watch / f"f{i % 2}", f"p{i}", seed=i)
    (watch / "bad.png").write_bytes(b"")
    first = ingest_paths(state)
    again = ingest_paths(state, full=False)  # what the daemon's rescans hold: a count, not a list
    assert not again.queued and not again.rejected and again.n_unchanged == 5
    assert [(os.path.basename(r["path"]), r["outcome"]) for r in again.unchanged] == [("bad.png", "rejected")]
    scan = json.loads(state.meta("last_scan"))  # `daemon status` says the same either way
    assert scan["unchanged"] == 5 and scan["rejected_files"] == 1 and scan["problems"][0]["path"].endswith("bad.png")
    listed = ingest_paths(state)
    assert listed.n_unchanged == 5 and sorted(paths(listed.unchanged)) == sorted(paths(first.queued) + ["bad.png"])


def test_the_daemons_rescan_counts_ignored_files_past_what_status_names(state, watch):
    from dopsd_continual.ingest import LISTED

    make_pair(watch, "keep")
    for i in range(LISTED + 30):  # raw files beside the pictures: ignored at every scan
        (watch / f"raw{i}.cr2").write_bytes(b"raw")
    full = ingest_paths(state)
    again = ingest_paths(state, full=False)
    assert len(full.ignored) == LISTED + 30 and len(again.ignored) == LISTED and again.n_ignored == LISTED + 30
    assert json.loads(state.meta("last_scan"))["ignored"] == LISTED + 30


def test_a_folder_that_goes_during_a_scan_is_passed_over_not_rejected(state, watch):
    from dopsd_continual.ingest import IngestReport, find_candidates

    for folder in ("a", "b", "c"):
        make_pair(watch / folder, folder)
    report = IngestReport()
    walk = find_candidates(watch, report)
    first = next(walk)  # the walk is in folder a: b goes (moved away by the user) before it is reached
    (watch / "b").rename(watch.parent / "b-moved")
    rest = list(walk)
    assert [c.image.name for c in [first, *rest]] == ["a.png", "c.png"] and not report.rejected and not report.ignored


def test_a_state_inside_a_watched_folder_is_not_scanned_as_pictures(tmp_path):
    from dopsd_continual.store import init_state

    photos = tmp_path / "photos"
    make_pair(photos, "p0", seed=1)
    make_pair(photos / "trip", "p1", seed=2)
    st = init_state(photos / "state", None, [photos])  # `dopsd init --watch .` run in the photos folder
    try:
        first, again = ingest_paths(st), ingest_paths(st)
        assert paths(first.queued) == ["p0.png", "p1.png"] and not first.rejected and not again.rejected
        assert [r["reason"] for r in first.ignored] == ["dopsd's state folder: its own copies, not your pictures"]
        assert st.db["samples"].count == 2 and not again.queued and not again.duplicates
    finally:
        st.close()


def test_a_scan_taken_a_batch_at_a_time_queues_in_the_order_of_the_walk(state, watch):
    names = []  # nested folders, files in the root after a folder's name, batches that cross folders
    for folder, n in [("b", 3), ("a/y", 2), ("a", 2), (".", 2), ("a/x", 1)]:
        for i in range(n):
            stem = f"{folder.replace('/', '_').strip('.')}{i}"
            make_pair(watch / folder, stem, seed=len(names))
            names.append((Path(folder) / f"{stem}.png").as_posix().lstrip("./"))
    rep = ingest_paths(state, batch=3)
    walked = sorted(names, key=lambda n: Path(n).parent.parts)  # a folder's files, then its folders, by name
    order = [r["source_path"] for r in state.db.query("select source_path from samples order by id")]
    assert [os.path.relpath(p, watch) for p in order] == walked and len(rep.queued) == 10


def test_duplicate_bytes_are_reported_not_queued(state, watch):
    img = make_pair(watch, "a", seed=5)
    (watch / "copy").mkdir()
    (watch / "copy" / "b.png").write_bytes(img.read_bytes())
    (watch / "copy" / "b.txt").write_text("a large red circle in the center, blue background")
    rep = ingest_paths(state)
    assert len(rep.queued) == 1 and len(rep.duplicates) == 1
    assert state.db["samples"].count == 1


def test_changed_caption_updates_the_sample_and_requeues_it(state, watch):
    make_pair(watch, "a", "old caption")
    ingest_paths(state)
    sid = next(state.db["samples"].rows)["id"]
    state.db["samples"].update(sid, {"status": "used"})
    time.sleep(0.01)
    (watch / "a.txt").write_text("new caption")
    rep = ingest_paths(state)
    assert paths(rep.updated) == ["a.png"]
    row = state.db["samples"].get(sid)
    assert row["caption"] == "new caption" and row["status"] == "queued"
    assert any(h.get("old") == "old caption" for h in json.loads(row["history"]))


def test_rejected_file_is_looked_at_again_when_it_changes(state, watch):
    make_image(watch / "a.png")
    assert "missing caption" in reasons(ingest_paths(state))["a.png"]
    again = ingest_paths(state)  # the same verdict stands: kept, not reported again
    assert not again.rejected and [(r["outcome"], "missing caption" in r["reason"]) for r in again.unchanged] == [("rejected", True)]
    (watch / "a.txt").write_text("now with a caption")
    assert paths(ingest_paths(state).queued) == ["a.png"]


def test_queued_sample_survives_deleting_the_original(state, watch):
    img = make_pair(watch, "a")
    data = img.read_bytes()
    ingest_paths(state)
    img.unlink()
    row = next(state.db["samples"].rows)
    assert (state.root / row["image_blob"]).read_bytes() == data
    assert row["status"] == "queued"


def test_a_second_process_reads_while_ingestion_writes(state, watch):
    for i in range(120):
        make_pair(watch, f"p{i:03d}")
    reader = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys, time, sqlite3\n"
            "from dopsd_continual.store import open_db\n"
            "db = open_db(sys.argv[1]); seen = 0; t = time.time()\n"
            "while time.time() - t < 60:\n"
            "    n = db.execute('select count(*) from samples').fetchone()[0]; seen = max(seen, n)\n"
            "    if n >= 120: break\n"
            "print(seen)\n")
         , str(state.root / "dopsd.sqlite")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    rep = ingest_paths(state, batch=10)
    out, err = reader.communicate(timeout=30)
    assert reader.returncode == 0, err
    assert len(rep.queued) == 120 and int(out.strip()) == 120


def test_load_rgb_alpha_composites_on_white():
    im = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    assert load_rgb_bytes(buf.getvalue()).getpixel((0, 0)) == (255, 255, 255)


def _heic(path, size=(64, 48), seed=0):
    import pillow_heif

    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    pillow_heif.from_pillow(Image.fromarray(arr)).save(str(path), quality=90)


@pytest.mark.parametrize("name, make", [
    ("iphone.heic", lambda p: _heic(p)),
    ("IMG_0002.HEIF", lambda p: _heic(p, seed=1)),
    ("modern.avif", lambda p: make_image(p, size=(64, 48), fmt="AVIF", seed=2)),
    ("still.gif", lambda p: make_image(p, size=(64, 48), fmt="GIF", seed=3)),
])
def test_phone_and_web_formats_are_queued_with_their_original_bytes(state, watch, name, make):
    make(watch / name)
    (watch / name).with_suffix(".txt").write_text("a caption")
    rep = ingest_paths(state)
    assert paths(rep.queued) == [name] and not rep.ignored and not rep.rejected, (rep.ignored, rep.rejected)
    row = next(state.db["samples"].rows)
    assert (row["width"], row["height"]) == (64, 48)
    assert (state.root / row["image_blob"]).read_bytes() == (watch / name).read_bytes()  # the original, unconverted
    im = sample_image(state, row)
    assert im.mode == "RGB" and im.size == (64, 48)


@pytest.mark.parametrize("name, fmt", [("anim.gif", "GIF"), ("anim.webp", "WEBP"), ("anim.avif", "AVIF")])
def test_an_animated_image_is_taken_by_its_first_frame_with_a_note(state, watch, name, fmt):
    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "blue", "green")]
    frames[0].save(watch / name, format=fmt, save_all=True, append_images=frames[1:], duration=100)
    (watch / name).with_suffix(".txt").write_text("a caption")
    rep = ingest_paths(state)
    assert paths(rep.queued) == [name]
    assert rep.queued[0]["note"] == "3 frames: the first is used"
    row = next(state.db["samples"].rows)
    r, g, b = sample_image(state, row).getpixel((32, 32))
    assert r > 200 and g < 60 and b < 60  # red: the first frame
    assert json.loads(row["history"])[0]["note"] == "3 frames: the first is used"


def test_an_unsupported_image_is_reported_once_with_its_caption_named(state, watch):
    make_image(watch / "scan.tiff", fmt="TIFF")
    (watch / "scan.txt").write_text("a caption")
    rep = ingest_paths(state)
    assert [(os.path.basename(i["path"]), i["reason"]) for i in rep.ignored] == [
        ("scan.tiff", "unsupported file type '.tiff' (its caption scan.txt is not used)")]


def test_a_file_is_one_path_whatever_folder_the_scan_ran_in(tmp_path, monkeypatch):
    """`dopsd ingest drop` from one folder and `dopsd ingest /abs/drop` (or `.` from inside it) later: the same
    file, found unchanged, not a duplicate of itself; the queue shows where it is, not where the command ran."""
    from dopsd_continual.store import init_state

    st = init_state(tmp_path / "s", None, [])
    make_pair(tmp_path / "drop", "one", seed=1)
    monkeypatch.chdir(tmp_path)
    first = ingest_paths(st, [Path("drop")])
    assert len(first.queued) == 1
    assert st.rows("select source_path from samples")[0]["source_path"] == str(tmp_path / "drop" / "one.png")
    monkeypatch.chdir(tmp_path / "drop")
    for again in ([tmp_path / "drop"], [Path(".")], [Path("../drop/one.png")]):
        r = ingest_paths(st, again)
        assert not r.duplicates and not r.queued and len(r.unchanged) == 1, (again, r.to_json())
    st.close()
