"""A round: lock, select samples, load, train, save candidate, gate, commit. And recovery after a crash."""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

from .errors import UserError
from .files import walk_files
from .ingest import _history, sample_image
from .recipe import recipe_hash
from .stack import get_version, next_version_id, write_version
from .store import State, disk_words, flock_held, is_disk_full, now, round_lock, round_running  # noqa: F401 (round_lock: the round's, kept here)


@contextmanager
def render_lock(state: State):
    """Held by a dashboard's render while it draws, and by a round from just after it starts to its end; so a
    round waits at most for the render in progress (renders wait for rounds: render_turn)."""
    if state.readonly:
        yield
        return
    with flock_held(state.root / "render.lock"):
        yield


def running_round(state: State) -> str | None:
    """The version of a round in progress in any process (store.round_alive)."""
    from .store import round_alive

    row = state.conn.execute("select version, pid from rounds where status='running' order by id desc limit 1").fetchone()
    return row[0] if row and round_alive(state.root, row[1]) else None


@contextmanager
def render_turn(state: State, on_wait=None, stop=None, every: float = 0.5, busy: bool = False):
    """A render's turn to use the model: after any round in progress, holding the render lock. A round that
    starts while a render waits for the lock goes first. busy: a round in progress raises ModelBusy at once."""
    import time

    while True:
        vid = running_round(state)
        if vid is None:
            with render_lock(state):
                if running_round(state) is None:
                    yield
                    return
            continue
        if busy:
            from .errors import ModelBusy

            raise ModelBusy(f"round {vid}")
        if on_wait:
            on_wait(f"round {vid}")
        if stop and stop():
            raise InterruptedError("stopping")
        time.sleep(every)


def recover(state: State) -> list[str]:
    """Rounds whose process died: mark interrupted, quarantine candidate files, samples back to the queue.

    Only called with the round lock held, so a row still 'running' belongs to a dead process.
    """
    done = [_interrupt(state, dict(r), "the round's process died") for r in list(state.db["rounds"].rows_where("status = 'running'"))]
    for tmp in state.adapters.glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    watched = {os.path.realpath(w) for w in state.watch_dirs}  # a watched folder inside the state is the user's
    for e in walk_files(state.root, skip=watched):  # atomic_write's leftovers
        if fnmatch.fnmatchcase(e.name, ".*.tmp-*"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(e.path)
    shutil.rmtree(state.cache / "rounds", ignore_errors=True)  # a several-process round's job files
    if state.conn.execute("pragma quick_check").fetchone()[0] != "ok":
        raise UserError(f"the database {state.root / 'dopsd.sqlite'} failed its integrity check")
    return done


DISK_MARGIN = 64 * 2**20  # room kept beyond a round's own files (the database, logs, the reports)


def disk_need(state: State, sampler, train: dict, n_samples: int) -> int:
    """Bytes a round writes at most: its delta (float32 A and B on every target layer), the features of
    samples not cached yet (as large as the largest cached one, else a guess from the latents), the gate's
    pictures in float32 (held-out x seeds, the few-step gap, the round's concept pictures; parent and
    candidate), plus a margin."""
    from .gate import held_out_prompts
    from .lora import resolve_targets

    m, g = state.recipe["model"], state.recipe["gate"]
    tr = sampler.pipe.transformer
    modules = dict(tr.named_modules())
    rank = int(train["rank"])
    delta = sum((modules[n].in_features + modules[n].out_features) * rank * 4 for n in resolve_targets(tr, train["targets"])
                if hasattr(modules[n], "in_features"))
    cached = [f.stat().st_size for f in (state.cache / "features").rglob("*.safetensors")][:256]
    per_sample = max(cached) if cached else 3 * m["height"] * m["width"] * 4  # a float32 picture: the order of it
    picture = 3 * m["height"] * m["width"] * 4
    gate = 0
    if g["enabled"]:
        held = len(held_out_prompts(state.recipe)) * len(g["seeds"])
        gate = 2 * (held + 16 + 3 * GATE_CONCEPTS) * picture
    return delta + n_samples * per_sample + gate + DISK_MARGIN


def uncached(state: State, samples: list[dict]) -> int:
    """How many of these samples have no cached features yet (under any encoder's folder): only they write."""
    from .store import feature_key

    feats = state.cache / "features"
    have = {f.name.split(".", 1)[0] for f in feats.rglob("*.safetensors")} if feats.exists() else set()
    return sum(feature_key(s["sha256"], s["caption"]) not in have for s in samples)


def check_disk(state: State, need: int) -> None:
    """Refuse a round the state's file system cannot hold, before it writes anything large."""
    import shutil as sh

    from .errors import DiskFull

    free = sh.disk_usage(state.root).free
    state_meta_quiet(state, "disk_need_bytes", str(need))
    if free < need:
        raise DiskFull(f"the disk is full for a round: {state.root} has {free / 2**20:.0f} MB free, the round needs "
                       f"about {need / 2**20:.0f} MB; free some space (`dopsd gc` shows what the state can give back)",
                       need, free)


def state_meta_quiet(state: State, key: str, value: str) -> None:
    import sqlite3

    try:
        state.set_meta(key, value)
    except sqlite3.Error:
        pass


def abandon_quietly(state: State, message: str) -> None:
    """abandon_running where the database may not take the write (a full disk): then the round's row and
    its samples stay as they are, every reader shows them as what they are (a round whose process is gone:
    store.effective_status), and the next round's recovery writes it."""
    import sqlite3

    try:
        abandon_running(state, message)
    except (sqlite3.Error, OSError):
        pass


def abandon_running(state: State, message: str, pid: int | None = None) -> list[str]:
    """This process's own running round (or that of `pid`, a round's process that has ended), stopped on
    purpose (SIGTERM) or failed: same clean-up as a crash."""
    rows = state.db["rounds"].rows_where("status = 'running' and pid = ?", [pid or os.getpid()])
    return [_interrupt(state, dict(r), message) for r in list(rows)]


def _interrupt(state: State, r: dict, message: str) -> str:
    vid = r["version"]
    with state.conn:
        state.conn.execute("BEGIN IMMEDIATE")
        state.db["rounds"].update(r["id"], {"status": "interrupted", "finished_at": now(), "message": message})
        try:
            v = get_version(state, vid)
            if v["status"] == "candidate":
                state.db["versions"].update(vid, {"status": "interrupted", "reasons": json.dumps([message])})
        except UserError:
            pass  # stopped before its candidate existed: no version is left behind (the round's row says why)
        for sid in json.loads(r["samples"] or "[]"):
            row = state.db["samples"].get(sid)
            if row["status"] == "training":
                state.db["samples"].update(sid, {"status": "queued", "history": _history(row["history"], {"event": f"round {vid} interrupted"})})
    if (state.adapters / vid).exists():  # a candidate written before the crash: kept aside, never active
        q = state.root / "quarantine"
        q.mkdir(exist_ok=True, mode=0o700)
        shutil.move(str(state.adapters / vid), str(q / f"{vid}-{int(now())}"))
    return vid


def select_samples(state: State, max_new: int | None = None, pool: int | None = None) -> tuple[list[dict], list[dict]]:
    """Queued samples (the oldest first), and the replay pool of the active chain (stack.replay_pool; its size
    defaults to the recipe's train.replay_pool)."""
    from .stack import replay_pool

    new = [dict(r) for r in state.db["samples"].rows_where("status = 'queued'", order_by="id")]
    if max_new:
        new = new[:max_new]
    return new, replay_pool(state, state.recipe["train"]["replay_pool"] if pool is None else pool)


@dataclass
class Round:
    """What a round's steps pass on to the next: settings, the samples, the loaded model, the results."""

    state: State
    train: dict
    device: object
    new: list[dict]
    replay: list[dict]
    parent: str
    vid: str
    rid: int
    progress: Callable[[int, int, float], None] | None = None
    sampler: object = None
    backend: object = None
    cache: object = None
    feats_new: list = field(default_factory=list)
    feats_replay: list = field(default_factory=list)
    result: object = None
    metrics: dict = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    phases: object = None

    @property
    def ids(self) -> list[int]:
        return [s["id"] for s in self.new]

    def report(self, step: int, total: int, loss: float) -> None:
        self.state.db["rounds"].update(self.rid, {"progress": step / total})
        if self.progress:
            self.progress(step, total, loss)

    def summary(self) -> dict:
        verdict = "rejected" if self.reasons else "accepted"
        return {"version": self.vid, "parent": self.parent, "verdict": verdict, "reasons": self.reasons,
                "metrics": self.metrics, "samples": self.ids, "active": self.state.active_version}


def run_round(
    state: State,
    objective: str | None = None,
    steps: int | None = None,
    lr: float | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    wait_for_lock: bool = False,
    sampler=None,
    processes: int | None = None,
) -> dict:
    """One round: lock, select samples, load, features, train, save the candidate, gate, commit.
    processes: data-parallel training processes (default: the recipe's train.processes); more than one hands
    the train phase to accelerate's launcher (distributed.py)."""
    from .distributed import check_processes
    from .memory import check_fits
    from .placement import compute_device

    train = round_settings(state.recipe, objective, steps, lr, processes)
    device = sampler.device if sampler else compute_device()
    check_processes(int(train["processes"]), device.type)
    check_fits({**state.recipe, "train": train}, device)  # a round the card cannot hold is refused before it starts
    if state.recipe["gate"]["enabled"]:  # a judge that cannot be imported fails now, not after the training
        from .gate import judge_names
        from .judges import resolve

        for name in judge_names(state.recipe):
            resolve(name)
    with round_lock(state, wait=wait_for_lock), ExitStack() as held:
        held.enter_context(round_running(state))  # readers tell this round from a row a failed clean-up left
        rnd = begin(state, train, device, progress)
        held.enter_context(render_lock(state))  # a dashboard's render in progress finishes first; no new one starts
        try:  # from the row on, any failure (a load error, no GPU memory, an interrupt) ends as 'interrupted'
            load(rnd, sampler)
            features(rnd)
            train_candidate(rnd, should_stop)
            save_candidate(rnd)
            judge(rnd)
            commit_verdict(state, rnd.rid, rnd.vid, rnd.new, "rejected" if rnd.reasons else "accepted", rnd.reasons,
                           rnd.metrics, [rnd.new[i]["id"] for i in rnd.result.seen])
        except BaseException as e:  # the candidate, if written, is kept as 'interrupted'; its samples queue again
            abandon_quietly(state, f"the round stopped before it finished ({disk_words(e, state.root)})"
                            if is_disk_full(e) else "the round stopped before it finished")
            raise
        return rnd.summary()


def round_settings(recipe: dict, objective: str | None, steps: int | None, lr: float | None,
                   processes: int | None) -> dict:
    """The recipe's [train] with the command's overrides."""
    train = dict(recipe["train"])
    if objective:
        if objective not in ("dopsd", "sft"):
            raise UserError(f"unknown objective {objective!r}: dopsd or sft")
        train["objective"] = objective
    for key, value in (("steps", steps), ("lr", lr), ("processes", processes)):
        if value is not None:
            train[key] = value
    return train


def begin(state: State, train: dict, device, progress) -> Round:
    """Under the round lock: recover what a crash left, take the oldest queued samples (and the replay pool),
    and write the round's row with its samples marked `training`."""
    from .placement import PhaseLog
    from .training import new_per_round

    recover(state)
    new, replay = select_samples(state, pool=int(train["replay_pool"]))
    if not new:
        raise UserError("no queued samples: drop image + caption pairs into a watched folder and run `dopsd ingest`")
    new = new[: new_per_round(train, bool(replay))]  # the oldest first; the rest wait for the next rounds
    tries = max((s["rejections"] or 0) for s in new)
    if tries:  # a batch rejected before is not retrained unchanged: another seed draws other noise and batches
        train["seed"] = int(train["seed"]) + tries
    parent, vid = state.active_version, next_version_id(state)
    with state.conn:
        state.conn.execute("BEGIN IMMEDIATE")
        rid = state.db["rounds"].insert({"version": vid, "status": "running", "pid": os.getpid(), "started_at": now(),
                                         "progress": 0.0, "samples": json.dumps([s["id"] for s in new])}).last_pk
        for s in new:
            state.db["samples"].update(s["id"], {"status": "training"})
    return Round(state, train, device, new, replay, parent, vid, rid, progress, phases=PhaseLog(device))


def load(rnd: Round, sampler=None) -> None:
    """The model (or the caller's, already loaded), then the disk space the round will write checked."""
    from .sampling import Sampler

    with rnd.phases("load"):
        rnd.sampler = sampler or Sampler(rnd.state)
    check_disk(rnd.state, disk_need(rnd.state, rnd.sampler, rnd.train, uncached(rnd.state, rnd.new + rnd.replay)))


def features(rnd: Round) -> None:
    """Every sample's features, from the cache or computed once: the encoders visit the GPU once, the
    transformer waits in CPU memory. The gate's texts are encoded in the same visit."""
    from .families import family
    from .gate import Gate
    from .sampling import image_tensor
    from .training import FeatureCache

    state, recipe, sampler = rnd.state, rnd.state.recipe, rnd.sampler
    h, w = recipe["model"]["height"], recipe["model"]["width"]
    with rnd.phases("features"):
        sampler.place.use("features")
        rnd.backend = family(recipe).backend(sampler.pipe, recipe, sampler.device, encoders=False)
        rnd.cache = cache = FeatureCache(state.cache / "features", rnd.backend.encoder_id)
        if not all(cache.path(s["sha256"], s["caption"]).exists() for s in rnd.new + rnd.replay):
            rnd.backend = family(recipe).backend(sampler.pipe, recipe, sampler.device)  # encoders only a miss needs

        def one(s: dict) -> dict:
            return cache.get(s["sha256"], s["caption"],
                             lambda: rnd.backend.features(s["caption"], image_tensor(fit(sample_image(state, s), w, h))))

        rnd.feats_new = [one(s) for s in rnd.new]
        rnd.feats_replay = [one(s) for s in rnd.replay]
        rnd.backend.release_encoders()
        if recipe["gate"]["enabled"]:  # the text encoder is on the GPU now: the gate's prompts too
            sampler.prompt_features(Gate(state, sampler).texts(gate_choice(rnd.new)))


def train_candidate(rnd: Round, should_stop) -> None:
    """A new delta on top of the parent's chain: here, or in several processes through accelerate."""
    from .distributed import jobs_dir, train_in_processes
    from .training import train_delta

    state, sampler, cache, train = rnd.state, rnd.sampler, rnd.cache, rnd.train
    with rnd.phases("train"):
        if int(train["processes"]) > 1:  # the ranks load their own transformer: this one waits in CPU memory
            sampler.place.park()
            job = {"state": str(state.root), "parent": rnd.parent, "train": train,
                   "new": [str(cache.path(s["sha256"], s["caption"])) for s in rnd.new],
                   "replay": [str(cache.path(s["sha256"], s["caption"])) for s in rnd.replay]}
            job_dir = jobs_dir(state) / rnd.vid
            rnd.result = train_in_processes(state, job_dir, job, int(train["processes"]), sampler.device.type,
                                            rnd.report, should_stop)
            shutil.rmtree(job_dir, ignore_errors=True)
        else:
            sampler.place.use("train")
            sampler.switch.set(state, rnd.parent)  # train on top of the active chain (stack.WeightSwitcher)
            rnd.result = train_delta(rnd.backend, rnd.feats_new, rnd.feats_replay, train, train["objective"],
                                     rnd.report, should_stop)


def save_candidate(rnd: Round) -> None:
    """The delta on disk and its `candidate` row; the training figures in the round's metrics."""
    state, train, result, recipe = rnd.state, rnd.train, rnd.result, rnd.state.recipe
    meta = {"objective": train["objective"], "recipe_hash": recipe_hash(recipe), "samples": rnd.ids,
            "replay_samples": [s["id"] for s in rnd.replay], "train": train,
            "loss_first": result.losses[0], "loss_last": result.losses[-1]}
    write_version(state, rnd.vid, rnd.parent, result.delta, meta)
    state.db["versions"].insert({"id": rnd.vid, "parent": rnd.parent, "status": "candidate", "created_at": now(),
                                 "objective": train["objective"], "recipe_hash": recipe_hash(recipe),
                                 "samples": json.dumps(rnd.ids), "metrics": "{}", "reasons": "[]",
                                 "adapter_dir": str((state.adapters / rnd.vid).relative_to(state.root))})
    rnd.metrics = {"loss_first": result.losses[0], "loss_last": result.losses[-1], "train_seconds": result.seconds,
                   "samples_per_s": result.samples_per_s, "feature_cache_hits": rnd.cache.hits,
                   "processes": int(train["processes"]), "seed": int(train["seed"]),
                   "samples_trained": len(result.seen), "samples_taken": len(rnd.new)}


def judge(rnd: Round) -> None:
    """The gate's metrics and verdict on the candidate against its parent, and its report."""
    from .gate import Gate

    state, metrics = rnd.state, rnd.metrics
    if not state.recipe["gate"]["enabled"]:
        metrics["gate"] = "disabled in the recipe: accepted without checks"
        metrics["phases"] = rnd.phases.records
        return
    with rnd.phases("gate"):
        gate = Gate(state, rnd.sampler)
        round_samples = gate_samples(state, rnd.new)
        m = gate.metrics(rnd.vid, rnd.parent, round_samples)
        rnd.reasons = gate.verdict(m)
        metrics.update(m)
    metrics["phases"] = rnd.phases.records
    gate.report(rnd.vid, rnd.parent, metrics, rnd.reasons, round_samples)


def commit_verdict(state: State, rid: int, vid: str, new: list[dict], verdict: str, reasons: list[str], metrics: dict,
                   seen: list[int] | None = None) -> None:
    """The verdict on the version and its samples. `used` means trained on: a sample the round took but no step
    drew goes back to the queue as it was (seen: the ids drawn; None: all of them)."""
    limit = state.recipe["gate"]["max_rejections_per_sample"]
    seen_set = set(seen) if seen is not None else {s["id"] for s in new}
    with state.conn:
        state.conn.execute("BEGIN IMMEDIATE")
        state.db["versions"].update(vid, {"status": verdict, "metrics": json.dumps(metrics), "reasons": json.dumps(reasons)})
        for s in new:
            row = state.db["samples"].get(s["id"])
            if s["id"] not in seen_set:
                state.db["samples"].update(s["id"], {"status": "queued", "updated_at": now(), "history": _history(
                    row["history"], {"event": f"round {vid} took it but drew it in no step: queued again"})})
                continue
            rounds = json.loads(row["rounds"] or "[]") + [vid]
            if verdict == "accepted":
                upd = {"status": "used", "rounds": json.dumps(rounds)}
            else:
                n = (row["rejections"] or 0) + 1
                upd = {"status": "set_aside" if n >= limit else "queued", "rejections": n, "rounds": json.dumps(rounds)}
            event = {"event": f"round {vid} {verdict}"}
            if verdict == "rejected":
                event["reasons"] = reasons
                if upd["status"] == "set_aside":
                    event["event"] += f": set aside after {upd['rejections']} rejected rounds (`dopsd queue retry` brings it back)"
            upd["history"] = _history(row["history"], event)
            upd["updated_at"] = now()
            state.db["samples"].update(s["id"], upd)
        if verdict == "accepted":
            state.db["meta"].upsert({"key": "active_version", "value": vid}, pk="key")
        state.db["rounds"].update(rid, {"status": "done", "finished_at": now(), "progress": 1.0, "message": verdict})


GATE_CONCEPTS = 8  # the round's captions the gate samples: the same cost for 8 new pairs or 2,000


def gate_samples(state: State, samples: list[dict]) -> list[dict]:
    """The round's samples as the gate needs them (caption, hash, the picture at the model's size), at most
    GATE_CONCEPTS of them, chosen by their hashes: the same choice every time for the same samples."""
    h, w = state.recipe["model"]["height"], state.recipe["model"]["width"]
    return [{"caption": s["caption"], "sha256": s["sha256"], "image": fit(sample_image(state, s), w, h)}
            for s in gate_choice(samples)]


def gate_choice(samples: list[dict]) -> list[dict]:
    """At most GATE_CONCEPTS of the samples, the same ones every time (the lowest hashes), in their order."""
    keep = {s["sha256"] for s in sorted(samples, key=lambda s: s["sha256"])[:GATE_CONCEPTS]}
    return [s for s in samples if s["sha256"] in keep]


def fit(im, w: int, h: int):
    """Scale to cover w x h, then centre-crop: the same framing for training features and the gate."""
    from PIL import Image

    if im.size == (w, h):
        return im
    sw, sh = im.size
    scale = max(w / sw, h / sh)
    im = im.resize((max(w, round(sw * scale)), max(h, round(sh * scale))), Image.LANCZOS)
    left, top = (im.width - w) // 2, (im.height - h) // 2
    return im.crop((left, top, left + w, top + h))
