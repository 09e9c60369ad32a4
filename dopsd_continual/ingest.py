"""Ingestion: find image + caption pairs, wait until they are stable, validate, copy into blobs, queue.

The one function `ingest_paths` is what `dopsd ingest` and the daemon's watchers and rescans call.
Nothing in the user's folders is ever written, moved or deleted: the bytes we validate are the bytes we
copy into state/blobs (content-addressed by SHA-256), and only then is the sample queued.

Decisions (documented in the README):
- Identity is the SHA-256 of the image bytes. A byte-identical image is a duplicate, reported, never queued
  twice. A changed caption for a known image updates the sample's caption (the old one stays in its
  history and its blob stays on disk); a sample that was already used goes back to the queue, so the
  model learns the corrected caption.
- A `.txt` beside an image wins over a `metadata.jsonl` entry for the same image.
- Files still changing (modified within `stability_seconds`) are reported as "pending" and taken by a
  later scan.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError
from pillow_heif import register_heif_opener

from .files import private_dirs
from .store import State, fsync_dir, now

register_heif_opener()  # HEIC/HEIF through pillow-heif; Pillow reads AVIF itself
IMAGE_EXTS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".heic": "HEIF", ".heif": "HEIF",
              ".avif": "AVIF", ".gif": "GIF"}
CAPTION_EXT = ".txt"
METADATA_NAME = "metadata.jsonl"
SYSTEM_NAMES = {".ds_store", "thumbs.db", "desktop.ini", "icon\r"}
SYSTEM_DIRS = {"@eadir", "__macosx", ".stfolder", ".stversions", ".trash", "$recycle.bin"}
MISSING_PATH = "path does not exist"
PARTIAL_SUFFIXES = (".part", ".crdownload", ".tmp", ".partial", ".download")
LISTED = 50  # the problems `daemon status` names (the rest are counted)


@dataclass
class IngestReport:
    queued: list[dict] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)
    ignored: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    pending: list[dict] = field(default_factory=list)
    updated: list[dict] = field(default_factory=list)
    unchanged: list[dict] = field(default_factory=list)  # seen before with these bytes: its outcome stands
    # full: every file named (`dopsd ingest`'s report). Else (the daemon's rescans) the unchanged and the ignored
    # are counted, and only the files rejected before and the first LISTED ignored are named: what a rescan
    # holds then follows what changed, not how many files the folders hold
    full: bool = True
    n_unchanged: int = 0
    n_ignored: int = 0

    def ignore(self, path: Path | str, reason: str) -> None:
        self.n_ignored += 1
        if self.full or len(self.ignored) < LISTED:
            self.ignored.append({"path": str(path), "reason": reason})

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in ("queued", "duplicates", "ignored", "rejected", "pending", "updated", "unchanged")}

    def counts(self) -> dict[str, int]:
        return {**{k: len(v) for k, v in self.to_json().items()}, "unchanged": self.n_unchanged, "ignored": self.n_ignored}


class Rejected(Exception):
    """A file we will not queue; the message is the recorded reason."""


def is_silently_ignored(name: str) -> bool:
    """Hidden/system files and partial downloads: not user content, never reported."""
    low = name.lower()
    return (
        name.startswith(".")
        or name.startswith("~")
        or low in SYSTEM_NAMES
        or low.endswith(PARTIAL_SUFFIXES)
        or low.endswith("~")
    )


@dataclass
class Candidate:
    image: Path
    caption_file: Path | None = None
    metadata_caption: str | None = None
    problem: str | None = None  # a pairing problem found while scanning (e.g. two images, one caption)


def _walk(root: Path, report: IngestReport, own: Path | None = None) -> Iterator[list[Path]]:
    """Every regular file under root, a folder's at a time. One bad entry (a link loop, an unreadable folder or
    file, a link out of the folder) is reported with its reason and skipped; the rest of the folder is still
    taken. A folder that goes while the scan runs is passed over (the next scan sees what is there); own, the
    state's folder when it lies inside a watched one, is not the user's pictures and is not walked.

    Links to files are followed when their target stays inside the watched folder. Links to folders are not
    descended: one leading out is reported as leaving the folder, one leading inside is reported as such,
    since its target's files are taken where they are (descending would take them twice or loop).
    """
    root_real = root.resolve()

    def unreadable(e: OSError) -> None:
        if e.errno != errno.ENOENT:
            report.rejected.append({"path": str(e.filename or root), "reason": f"unreadable folder: {e.strerror or e}"})

    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=unreadable):
        d = Path(dirpath)
        keep = []
        for dn in sorted(dirnames):
            p = d / dn
            if dn.lower() in SYSTEM_DIRS or dn.startswith("."):
                continue
            try:
                if p.is_symlink():
                    target = _resolve(p)
                    if target is None or not _inside(target, root_real):
                        reason = "symlink leaves the watched folder" if target is not None else "broken or looping symlink"
                    else:
                        reason = "link to a folder inside the watched folder (its files are taken where they are)"
                    report.ignore(p, reason)
                    continue
                if own is not None and p.resolve() == own:
                    report.ignore(p, "dopsd's state folder: its own copies, not your pictures")
                    continue
            except OSError as e:
                report.rejected.append({"path": str(p), "reason": f"unreadable folder: {e.strerror or e}"})
                continue
            keep.append(dn)
        dirnames[:] = keep
        files: list[Path] = []
        for fn in sorted(filenames):
            p = d / fn
            if is_silently_ignored(fn):
                continue
            try:
                if p.is_symlink():
                    target = _resolve(p)
                    if target is None:
                        report.ignore(p, "broken or looping symlink")
                        continue
                    if not _inside(target, root_real):
                        report.ignore(p, "symlink leaves the watched folder")
                        continue
                    if not target.is_file():
                        report.ignore(p, "symlink to something that is not a file")
                        continue
                elif not p.is_file():
                    if p.exists():  # gone meanwhile: the next scan decides
                        report.ignore(p, "not a regular file (a pipe, socket or device)")
                    continue
            except OSError as e:
                report.rejected.append({"path": str(p), "reason": f"unreadable: {e.strerror or e}"})
                continue
            files.append(p)
        if files:
            yield files


def _resolve(p: Path) -> Path | None:
    """A link's final target, or None when it is broken or loops."""
    try:
        return p.resolve(strict=True)
    except (OSError, RuntimeError):
        return None


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def find_candidates(root: Path, report: IngestReport, own: Path | None = None) -> Iterator[Candidate]:
    """The image-caption pairs under root, a folder's at a time (a folder's files pair among themselves), in
    the order of a walk with sorted names (own: _walk)."""
    for fs in _walk(root, report, own) if root.is_dir() else [[root]]:
        yield from _pair(fs[0].parent, fs, report)


def _pair(d: Path, fs: list[Path], report: IngestReport) -> list[Candidate]:
    """One folder's files as candidates; what is not one is reported."""
    out: list[Candidate] = []
    metadata = _read_metadata(d / METADATA_NAME, report) if (d / METADATA_NAME) in fs else {}
    images: dict[str, list[Path]] = {}
    captions: dict[str, Path] = {}
    unsupported: list[Path] = []
    for f in fs:
        ext = f.suffix.lower()
        if ext in IMAGE_EXTS:
            images.setdefault(f.stem, []).append(f)
        elif ext == CAPTION_EXT:
            captions[f.stem] = f
        elif f.name != METADATA_NAME:
            unsupported.append(f)
    for stem, imgs in sorted(images.items()):
        cap = captions.get(stem)
        if len(imgs) > 1 and cap is not None:
            names = ", ".join(sorted(i.name for i in imgs))
            for i in imgs:
                out.append(Candidate(i, cap, problem=f"{len(imgs)} images share the caption {cap.name} ({names})"))
            continue
        for i in imgs:
            out.append(Candidate(i, cap, metadata.get(i.name)))
    claimed = set()
    for f in unsupported:  # reported once; a caption of the same name is named as belonging to it
        cap = captions.get(f.stem) if f.stem not in images else None
        note = f" (its caption {cap.name} is not used)" if cap else ""
        if cap:
            claimed.add(f.stem)
        report.ignore(f, f"unsupported file type '{f.suffix or f.name}'{note}")
    for stem, cap in sorted(captions.items()):
        if stem not in images and stem not in claimed:
            report.ignore(cap, "caption without an image")
    present = {f.name for f in fs}
    for name in sorted(metadata):
        if name not in present:
            report.ignore(str(d / METADATA_NAME), f"metadata.jsonl names {name!r}, which is not in this folder")
    return out


def _read_metadata(path: Path, report: IngestReport) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        lines = path.read_bytes().decode("utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        report.rejected.append({"path": str(path), "reason": f"metadata.jsonl unreadable: {e}"})
        return out
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name, text = row["file_name"], row["text"]
            if not isinstance(name, str) or not isinstance(text, str):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError):
            report.rejected.append({"path": f"{path}:{n}", "reason": "metadata.jsonl line is not {\"file_name\", \"text\"}"})
            continue
        out[Path(name).name if "/" not in name else name] = text
    return out


def _signature(c: Candidate) -> tuple[str, float]:
    """(signature, last change) of the image and its caption: size + mtime_ns + ctime_ns."""
    parts, last = [], 0.0
    for p in (c.image, c.caption_file):
        if p is None:
            parts.append("-")
            continue
        st = p.stat()
        parts.append(f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}")
        last = max(last, st.st_mtime, st.st_ctime)
    if c.metadata_caption is not None:
        parts.append(hashlib.sha256(c.metadata_caption.encode()).hexdigest()[:16])
    return "|".join(parts), last


def read_caption(c: Candidate, recipe_ingest: dict) -> tuple[str, bytes]:
    """The caption text (trigger applied) and the raw bytes to keep. Raises Rejected with the reason."""
    if c.caption_file is not None:
        raw = c.caption_file.read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise Rejected(f"caption {c.caption_file.name} is not UTF-8 text") from None
    elif c.metadata_caption is not None:
        text = c.metadata_caption
        raw = text.encode("utf-8")
    elif recipe_ingest.get("default_caption"):
        text = recipe_ingest["default_caption"]
        raw = text.encode("utf-8")
    else:
        raise Rejected(f"missing caption ({c.image.stem}{CAPTION_EXT} or a metadata.jsonl entry)")
    text = text.strip()
    if not text:
        raise Rejected("empty caption")
    limit = recipe_ingest["max_caption_chars"]
    if len(text) > limit:
        raise Rejected(f"caption too long ({len(text)} > {limit} characters)")
    trigger = recipe_ingest.get("trigger_word") or ""
    if trigger:
        text = text.replace("[trigger]", trigger)
    return text, raw


def validate_image(data: bytes, ext: str, recipe_ingest: dict) -> tuple[int, int, str, str | None]:
    """Check image bytes; returns (width, height, format, note). Raises Rejected with the reason.

    An animated image (GIF, WebP, AVIF) or an image collection (a HEIC burst) is taken by its first
    frame, with a note saying so; the blob keeps every frame."""
    if not data:
        raise Rejected("empty file (0 bytes)")
    max_pixels = recipe_ingest["max_pixels"]
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            w, h = im.size  # from the header: nothing decoded yet
            if w * h > max_pixels:
                raise Rejected(f"image too large: {w}x{h} is over max_pixels {max_pixels}")
            if fmt != IMAGE_EXTS[ext]:
                raise Rejected(f"file is {fmt} but its extension says {IMAGE_EXTS[ext]}")
            frames = getattr(im, "n_frames", 1)
            note = f"{frames} frames: the first is used" if frames > 1 else None
            if min(w, h) < recipe_ingest["min_side"]:
                raise Rejected(f"image too small: {w}x{h} (min_side {recipe_ingest['min_side']})")
            im.verify()
    except Rejected:
        raise
    except Image.DecompressionBombError:
        raise Rejected(f"image too large (over max_pixels {max_pixels})") from None
    except UnidentifiedImageError:
        raise Rejected("not an image (unrecognised format)") from None
    except Exception as e:  # verify() raises many types on damaged files
        raise Rejected(f"truncated or damaged image: {e}") from None
    try:
        w, h = load_rgb_bytes(data).size  # the size as shown: after EXIF orientation
    except Exception as e:
        raise Rejected(f"truncated or damaged image: {e}") from None
    return w, h, fmt, note


def load_rgb_bytes(data: bytes) -> Image.Image:
    """Decode to 8-bit RGB: EXIF orientation applied; CMYK, palette, greyscale, 16-bit and alpha handled."""
    with Image.open(io.BytesIO(data)) as im:
        im.seek(0)  # the first frame of an animated image
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            import numpy as np

            # by the declared depth, never by the values: a dark 16-bit photo stays dark. Of the formats taken,
            # only 16-bit greyscale PNGs open in these modes (HEIF and AVIF open as 8-bit RGB).
            arr = np.asarray(im, dtype=np.float64)
            im = Image.fromarray((arr / 65535.0 * 255).round().clip(0, 255).astype("uint8"), "L")
        if im.mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")
        if im.mode in ("RGBA", "LA", "PA"):
            rgba = im.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, rgba)
        return im.convert("RGB")


def _blob_path(state: State, digest: str, ext: str) -> Path:
    return state.blobs / digest[:2] / f"{digest}{ext}"


def _write_blob(state: State, digest: str, ext: str, data: bytes) -> Path:
    """Content-addressed copy, synced in batches by the caller before the rows that name it commit.

    A new blob is created exclusively (O_EXCL) and written in place: no row can name it before the sync,
    so a crash can only leave an unnamed, short file. An existing blob of the wrong size (such a leftover,
    or another writer's copy in progress) is replaced atomically through a temp file.
    """
    path = _blob_path(state, digest, ext)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileNotFoundError:
        private_dirs(path.parent)
        return _write_blob(state, digest, ext, data)
    except FileExistsError:
        if path.stat().st_size == len(data):
            return path
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return path
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _history(old: str | None, event: dict) -> str:
    h = json.loads(old or "[]")
    h.append({"at": now(), **event})
    return json.dumps(h)


QUEUE_ACTIONS = {"retry": ("queued", "retry"), "drop": ("dropped", "dropped by user")}


def queue_action(state: State, sample_id: int, action: str) -> str:
    """`dopsd queue retry|drop ID` and the dashboard's buttons: the sample's new status."""
    from .errors import UserError

    if action not in QUEUE_ACTIONS:
        raise UserError(f"unknown queue action {action!r}; one of {', '.join(QUEUE_ACTIONS)}")
    status, event = QUEUE_ACTIONS[action]
    row = state.conn.execute("select history from samples where id = ?", [sample_id]).fetchone()
    if row is None:
        raise UserError(f"no sample with id {sample_id}")
    state.db["samples"].update(sample_id, {"status": status, "updated_at": now(), "history": _history(row[0], {"event": event})})
    return status


def stability_seconds(state: State) -> float:
    env = os.environ.get("DOPSD_STABILITY_SECONDS")
    if env is not None:
        from .errors import UserError

        try:
            value = float(env)
        except ValueError:
            raise UserError(f"DOPSD_STABILITY_SECONDS must be a number of seconds, got {env!r}") from None
        if not value >= 0:
            raise UserError(f"DOPSD_STABILITY_SECONDS must be >= 0, got {env!r}")
        return value
    return float(state.recipe["ingest"]["stability_seconds"])


def ingest_paths(state: State, paths: list[Path] | None = None, batch: int = 256,
                 full: bool = True) -> IngestReport:
    """One scan of the given paths (default: the watched folders). Safe to run again at any time.

    The folders are walked and taken `batch` pairs at a time, so a scan holds one folder's names and one batch,
    whatever the folders hold. full: the report names every file (else, the daemon's rescans, it counts
    those unchanged and ignored; IngestReport)."""
    report = IngestReport(full=full)
    # absolute (not resolved: a link the user gave stays as given): a file is one path whatever the folder the
    # command ran in, so a later scan from elsewhere finds it unchanged, and the pages show where it is
    roots = [Path(os.path.abspath(p)) for p in (paths or state.watch_dirs)]
    stable_after = stability_seconds(state)
    ing = state.recipe["ingest"]
    own = state.root.resolve()
    todo: list[tuple[Candidate, str]] = []
    for root in roots:
        if not root.exists():
            report.rejected.append({"path": str(root), "reason": MISSING_PATH})
            continue
        if root.is_file() and root.suffix.lower() not in IMAGE_EXTS:
            report.ignore(root, "not an image (give the image or its folder)")
            continue
        if root.is_file():
            cap = root.with_suffix(CAPTION_EXT)
            cands: Iterator[Candidate] = iter([Candidate(root, cap if cap.exists() else None)])
        else:
            cands = find_candidates(root, report, own if _inside(own, root.resolve()) else None)  # else no folder is it
        for c in cands:
            try:
                sig, last = _signature(c)
            except FileNotFoundError:
                continue  # vanished between listing and stat: the next scan decides
            except OSError as e:
                report.rejected.append({"path": str(c.image), "reason": f"unreadable: {e.strerror or e}"})
                continue
            if time.time() - last < stable_after:
                report.pending.append({"path": str(c.image), "reason": "still changing"})
                continue
            todo.append((c, sig))
            if len(todo) == batch:
                _ingest_batch(state, todo, ing, report)
                todo = []
    if todo:
        _ingest_batch(state, todo, ing, report)
    _record_scan(state, report)
    return report


def _record_scan(state: State, report: IngestReport, keep: int = LISTED) -> None:
    """The last scan's counts, the files rejected so far (this scan's and earlier ones that are still
    there unchanged) and the first `keep` of them and of this scan's ignored files, for `daemon status`."""
    standing = [{"path": r["path"], "reason": r.get("reason", "")} for r in report.unchanged if r["outcome"] == "rejected"]
    rejected = report.rejected + standing
    summary = {"at": now(), **report.counts(), "rejected_files": len(rejected),
               "problems": [{"outcome": "rejected", **r} for r in rejected[:keep]]
               + [{"outcome": "ignored", **r} for r in report.ignored[:keep]]}
    state.set_meta("last_scan", json.dumps(summary))


def _ingest_batch(state: State, items: list[tuple[Candidate, str]], ing: dict, report: IngestReport) -> None:
    db = state.db
    rows: list[tuple[str, dict]] = []  # (kind, payload) applied in one transaction after the blobs are synced
    wrote_blob = False

    for c, sig in items:
        path = str(c.image)
        known = db.execute("select signature, outcome, reason, sample_id from files where path=?", [path]).fetchone()
        if known and known[0] == sig:  # reported when it was new; a rescan does not report it again
            report.n_unchanged += 1
            if report.full or known[1] == "rejected":
                report.unchanged.append({"path": path, "outcome": known[1], **({"reason": known[2]} if known[2] else {})})
            continue
        try:
            if c.problem:
                raise Rejected(c.problem)
            data = c.image.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            caption, caption_raw = read_caption(c, ing)
            w, h, fmt, note = validate_image(data, c.image.suffix.lower(), ing)
        except Rejected as e:
            rows.append(("reject", {"path": path, "sig": sig, "reason": str(e)}))
            report.rejected.append({"path": path, "reason": str(e)})
            continue
        except OSError as e:
            rows.append(("reject", {"path": path, "sig": sig, "reason": f"unreadable: {e.strerror or e}"}))
            report.rejected.append({"path": path, "reason": f"unreadable: {e.strerror or e}"})
            continue
        cap_digest = hashlib.sha256(caption_raw).hexdigest()
        existing = db.execute("select id, caption, status, history from samples where sha256=?", [digest]).fetchone()
        if existing and existing[1] == caption:
            rows.append(("file", {"path": path, "sig": sig, "outcome": "duplicate", "sample_id": existing[0]}))
            report.duplicates.append({"path": path, "of": existing[0], "reason": "same image already ingested"})
            continue
        img_blob = _write_blob(state, digest, c.image.suffix.lower(), data)
        cap_blob = _write_blob(state, cap_digest, ".txt", caption_raw)
        wrote_blob = True
        if existing:
            rows.append(("recaption", {"path": path, "sig": sig, "id": existing[0], "caption": caption,
                                       "old_caption": existing[1], "status": existing[2], "history": existing[3],
                                       "caption_sha256": cap_digest, "caption_blob": str(cap_blob.relative_to(state.root))}))
            report.updated.append({"path": path, "id": existing[0], "reason": "caption changed"})
            continue
        rows.append(("queue", {"path": path, "sig": sig, "sample": {
            "sha256": digest, "status": "queued", "caption": caption, "caption_sha256": cap_digest,
            "source_path": path, "image_blob": str(img_blob.relative_to(state.root)),
            "caption_blob": str(cap_blob.relative_to(state.root)), "width": w, "height": h, "format": fmt,
            "rounds": "[]", "rejections": 0,
            "history": _history(None, {"event": "queued", "source": path, **({"note": note} if note else {})}),
            "created_at": now(), "updated_at": now()}, "note": note}))
    if wrote_blob:
        os.sync()  # blobs durable before the rows that name them commit
        fsync_dir(state.blobs)
    with db.conn:
        db.execute("BEGIN IMMEDIATE")
        for kind, r in rows:
            if kind == "reject":
                _file_row(db, r["path"], r["sig"], "rejected", r["reason"], None)
            elif kind == "file":
                _file_row(db, r["path"], r["sig"], r["outcome"], None, r["sample_id"])
            elif kind == "recaption":
                status = "queued" if r["status"] in ("used", "queued") else r["status"]
                db["samples"].update(r["id"], {
                    "caption": r["caption"], "caption_sha256": r["caption_sha256"], "caption_blob": r["caption_blob"],
                    "status": status, "updated_at": now(),
                    "history": _history(r["history"], {"event": "caption changed", "old": r["old_caption"]}),
                })
                _file_row(db, r["path"], r["sig"], "queued", None, r["id"])
            else:
                dup = db.execute("select id, caption from samples where sha256=?", [r["sample"]["sha256"]]).fetchone()
                if dup:  # the same image twice in one batch
                    _file_row(db, r["path"], r["sig"], "duplicate", None, dup[0])
                    reason = "same image already ingested" + (
                        "" if dup[1] == r["sample"]["caption"] else f", with another caption (sample {dup[0]} keeps its own)")
                    report.duplicates.append({"path": r["path"], "of": dup[0], "reason": reason})
                    continue
                sid = db["samples"].insert(r["sample"]).last_pk
                _file_row(db, r["path"], r["sig"], "queued", None, sid)
                report.queued.append({"path": r["path"], "id": sid, "sha256": r["sample"]["sha256"],
                                      "caption": r["sample"]["caption"], **({"note": r["note"]} if r["note"] else {})})


def _file_row(db, path: str, sig: str, outcome: str, reason: str | None, sample_id: int | None) -> None:
    db["files"].upsert({"path": path, "signature": sig, "outcome": outcome, "reason": reason,
                        "sample_id": sample_id, "seen_at": now()}, pk="path")


def sample_image(state: State, sample: dict) -> Image.Image:
    """A queued sample's picture as RGB, from its blob (the user's original may be gone), hash-checked."""
    from .errors import UserError
    from .store import read_inside

    data = read_inside(state.root, state.root / sample["image_blob"])
    if hashlib.sha256(data).hexdigest() != sample["sha256"]:
        raise UserError(f"blob {sample['image_blob']} of sample {sample['id']} is damaged (sha256 mismatch)")
    return load_rgb_bytes(data)
