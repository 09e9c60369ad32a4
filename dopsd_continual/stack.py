"""The versioned LoRA stack: immutable versions in a tree, an `active` pointer, verify-on-load.

A version's folder adapters/<id>/ holds delta.safetensors and manifest.json (sha256 of every file, rank,
targets, recipe hash, samples, parent, created). It is written into a temp folder, fsynced and renamed
into place, so a crash never leaves a half-written version visible. Rollback and promote move the
`active` pointer; nothing is deleted.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError
from .files import private_dirs
from .store import State, foreign_versions, fsync_dir, now

if TYPE_CHECKING:  # torch stays out of processes that only list versions or idle (the daemon)
    import torch

    from .lora import Delta

STATUSES = ("candidate", "accepted", "rejected", "interrupted", "corrupt")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def get_version(state: State, vid: str) -> dict:
    rows = state.rows("select * from versions where id = ?", [vid])
    if not rows:
        raise UserError(f"no version {vid!r} (see `dopsd versions list`)")
    return rows[0]


def next_version_id(state: State) -> str:
    ids = [int(v[1:]) for (v,) in state.conn.execute("select id from versions") if v[1:].isdigit()]
    return f"v{max(ids, default=0) + 1}"


def write_version(state: State, vid: str, parent: str, delta: Delta, meta: dict) -> Path:
    """Atomically create adapters/<vid>/ (temp folder, fsync, rename). Never overwrites a version."""
    final = state.adapters / vid
    if final.exists():
        raise UserError(f"version {vid} already exists")
    tmp = state.adapters / f".tmp-{vid}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    private_dirs(tmp.parent)
    tmp.mkdir(mode=0o700)
    delta.save(tmp / "delta.safetensors", {"version": vid, "parent": parent})
    manifest = {
        "version": vid,
        "parent": parent,
        "rank": delta.rank,
        "scale": delta.scale,
        "targets": sorted(delta.weights),
        "created_at": now(),
        **meta,
        "files": {"delta.safetensors": _sha(tmp / "delta.safetensors")},
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fsync_dir(tmp)
    os.replace(tmp, final)
    fsync_dir(state.adapters)
    return final


def load_delta(state: State, vid: str) -> Delta:
    """Verify the manifest's hashes, then load. A damaged version is marked corrupt and never loaded."""
    folder = state.adapters / vid
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        for name, digest in manifest["files"].items():
            if _sha(folder / name) != digest:
                raise ValueError(f"{name} does not match its manifest sha256")
        from .lora import Delta

        return Delta.load(folder / "delta.safetensors")
    except PermissionError as e:  # not damage: this user may not read the state's files
        raise UserError(f"version {vid} cannot be read: {e.strerror}: {e.filename}") from None
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        pruned = pruned_versions(state)
        if vid in pruned:  # removed by gc under a reader: said as that, and the row keeps its verdict
            raise UserError(f"version {vid}'s adapter was {pruned[vid]}") from None
        if not state.readonly:
            state.db["versions"].update(vid, {"status": "corrupt", "reasons": json.dumps([f"corrupt: {e}"])})
        back = intact_ancestor(state, vid)
        raise UserError(f"version {vid} is corrupt ({e}) and will not be loaded; "
                        f"`dopsd versions rollback {back}` makes its nearest intact ancestor active") from None


def intact_ancestor(state: State, vid: str) -> str:
    """The nearest ancestor of vid that is neither corrupt nor interrupted (v0 at worst)."""
    cur = get_version(state, vid)["parent"]
    while cur and cur != "v0":
        v = get_version(state, cur)
        if v["status"] not in ("corrupt", "interrupted"):
            break
        cur = v["parent"]
    return cur or "v0"


def parents(state: State) -> dict[str, str | None]:
    """Every version's parent, in one read (a chain hundreds deep is walked without a query per version)."""
    return dict(state.conn.execute("select id, parent from versions"))


def chain(state: State, vid: str) -> list[str]:
    """Version ids from the root's first child down to vid (v0, the base, has no adapter)."""
    parent = parents(state)
    out: list[str] = []
    cur = vid
    while cur and cur != "v0":
        if cur not in parent:
            get_version(state, cur)  # its one-line error
        if len(out) > len(parent):
            raise UserError(f"version {vid}'s chain loops at {cur}: the versions table is damaged")
        out.append(cur)
        cur = parent[cur]
    return list(reversed(out))


def replay_pool(state: State, size: int, vid: str | None = None) -> list[dict]:
    """The samples a round on top of `vid` (default: the active version) replays: those used by the versions
    on its chain, and of them, when there are more than `size` (0: no limit), the `size` with the smallest
    hash of id and content. The hash is fixed per sample, so the pool is a uniform random subset of the
    chain's history; while the chain grows by accepted rounds it changes only where a newer sample's hash
    displaces one, so a sample enters the pool in the round that trained it (its features just computed).
    A rollback, a retried sample or another size changes it more (those features are computed again). Disk
    and feature work stay bounded however long the history grows. By id."""
    used: set[int] = set()
    on_chain = set(chain(state, vid or state.active_version))
    for v, samples in state.conn.execute("select id, samples from versions"):
        if v in on_chain:
            used |= set(json.loads(samples or "[]"))
    # ranked on (id, hash) alone, the `size` smallest kept as the rows stream by: what this holds follows the
    # pool, not the history (whole rows of every used sample were a transient that grew with each round)
    found = ((i, sha) for i, sha in state.conn.execute("select id, sha256 from samples where status = 'used'") if i in used)
    if size:
        ids = sorted(i for _, i in heapq.nsmallest(size, ((_rank(i, sha), i) for i, sha in found)))
    else:
        ids = sorted(i for i, _ in found)
    rows: list[dict] = []
    for at in range(0, len(ids), 500):  # SQLite's limit on a statement's values
        part = ids[at:at + 500]
        rows += state.rows(f"select * from samples where id in ({','.join('?' * len(part))}) order by id", part)
    return rows


def _rank(sample_id: int, sha256: str) -> str:
    return hashlib.sha256(f"{sample_id}:{sha256}".encode()).hexdigest()


def chain_deltas(state: State, vid: str) -> list[Delta]:
    get_version(state, vid)
    ids = chain(state, vid)
    foreign = foreign_versions(state.conn)  # written by `dopsd init --force`
    for v in ids:
        if v in foreign:
            raise UserError(f"version {v} was trained on {foreign[v]}; this state now tunes "
                            f"{state.recipe['model']['name']} (its versions start again from v0)")
    pruned = pruned_versions(state)
    for v in ids:
        if v in pruned:
            raise UserError(f"version {v}'s adapter was {pruned[v]}; its row, metrics and report remain, but it "
                            "cannot be sampled, promoted or exported")
    return [load_delta(state, v) for v in ids]


CHAIN_RANK_FACTOR = 4  # a chain is squashed past 4x its rounds' rank (bench/bf16_versions.py: 1.1% at depth 5)


class WeightSwitcher:
    """Sets a transformer to any version as the stack describes it: base + the sum of scale x B @ A over its chain.

    float32 weights ("merge"): each touched Linear weight is base + sum(scale x B @ A), computed on the weight's
    own device from A and B; the touched base weights are kept once (CPU memory, the model's dtype). Exact, and
    a version samples at the bare model's cost.

    Lower precision, e.g. bf16 ("unmerged"): the base weights are never written. Each touched Linear carries
    the chain as one low-rank term applied beside it, y = W x + B_c (A_c x), with A_c and B_c the chain's
    factors stacked (exact), or, once the stacked rank passes `max_rank` (default 4x the rounds' rank), the
    chain squashed to its leading singular directions (computed in float32 on the weight's device); the
    factors are held in the model's dtype, which moves the product by a rounding of the term itself. A merge
    rounded into bf16 holds a different version from the one the stack describes; the unmerged term holds it
    whole, costs no copy of any weight, and is what an exported LoRA does in diffusers and ComfyUI. The factors are
    buffers of their Linear, so they move with it between the CPU and the GPU; a round's peft adapters wrap
    that Linear and add the new round on top of the chain. What a bf16 merge loses shows in the version's
    weights (float32 compute on the toy model: 26% of a round's effect, against 0.1% for the term); in bf16
    compute every way, merged or not, sits on the same floor of activation rounding (bench/bf16_versions.py).
    """

    def __init__(self, transformer, mode: str | None = None, max_rank: int | None = None, factor_dtype=None):
        import torch

        self.transformer = transformer
        self.mode = mode or ("merge" if transformer.dtype == torch.float32 else "unmerged")
        self.max_rank = max_rank
        self.factor_dtype = factor_dtype or transformer.dtype  # the term computes in the model's dtype
        self.base: dict[str, torch.Tensor] = {}  # merge: module name -> base weight (CPU), touched ones only
        self.hooked: set[str] = set()  # unmerged: modules that carry a chain term
        self.current: str | None = "v0"

    def set(self, state: State, vid: str) -> None:
        if vid == self.current:
            return
        self.apply(chain_deltas(state, vid))
        self.current = vid

    def apply(self, deltas: list[Delta]) -> None:
        if self.mode == "merge":
            self._merge(deltas)
        else:
            self._unmerged(deltas)

    def _merge(self, deltas: list[Delta]) -> None:
        import torch

        modules = dict(self.transformer.named_modules())
        names = {n for d in deltas for n in d.weights}
        with torch.no_grad():
            for name in names - set(self.base):
                self.base[name] = modules[name].weight.detach().to("cpu", copy=True)
            for name, base in self.base.items():
                weight = modules[name].weight
                merged = base.to(weight.device, torch.float32, copy=True)  # never an alias of the kept base
                for d in deltas:
                    if name in d.weights:
                        merged += d.product(name, weight.device)
                weight.copy_(merged.to(weight.dtype))

    def _unmerged(self, deltas: list[Delta]) -> None:
        import torch

        modules = dict(self.transformer.named_modules())
        names = {n for d in deltas for n in d.weights}
        with torch.no_grad():
            for name in self.hooked - names:  # touched by the last version, not by this one
                modules[name]._buffers.pop("chain_A", None)
                modules[name]._buffers.pop("chain_B", None)
            for name in names:
                mod = modules[name]
                dev = mod.weight.device if "weight" in mod._parameters else mod.qweight.device
                parts = [(d.weights[name][0], d.weights[name][1], d.scale) for d in deltas if name in d.weights]
                a = torch.cat([p[0].to(dev, torch.float32) for p in parts])
                b = torch.cat([p[1].to(dev, torch.float32) * p[2] for p in parts], dim=1)
                limit = self.max_rank or CHAIN_RANK_FACTOR * max(d.rank for d in deltas)
                if a.shape[0] > limit:
                    a, b = squash(a, b, limit)
                mod.register_buffer("chain_A", a.to(self.factor_dtype).contiguous(), persistent=False)
                mod.register_buffer("chain_B", b.to(self.factor_dtype).contiguous(), persistent=False)
                if not getattr(mod, "_chain_hooked", False):  # one hook per layer, however many switchers
                    mod.register_forward_hook(_chain_term)
                    mod._chain_hooked = True
        self.hooked = names


def _chain_term(module, args, out):
    """Forward hook of a Linear that a version touches: adds B_c (A_c x), the chain's unmerged term.

    One fused multiply-add (out + (x A^T) B^T, rounded once) either way. Where no gradient flows through the
    output (sampling, the gate, the teacher's pass) it is added into the output in place: a separate term
    and sum would each be as large as the output, and for klein's fused projection at the gate's batch
    that is 2 GiB apiece (measured on an H200 at a 14.5 GiB cap). Where one does, the same sum is a new
    tensor, as autograd needs."""
    import torch
    from torch.nn import functional as F

    a = module._buffers.get("chain_A")
    if a is None:
        return out
    b = module._buffers["chain_B"]
    xa = F.linear(args[0].to(a.dtype), a)  # (..., chain rank): small
    if out.dtype != b.dtype or not out.is_contiguous():
        return out + F.linear(xa, b).to(out.dtype)
    flat, xa2 = out.view(-1, out.shape[-1]), xa.reshape(-1, xa.shape[-1])
    if torch.is_grad_enabled() and out.requires_grad:
        return torch.addmm(flat, xa2, b.t()).view(out.shape)
    flat.addmm_(xa2, b.t())
    return out


def squash(a, b, rank: int):
    """The best rank-`rank` factors (A', B') of B @ A (truncated SVD through QR of both stacked factors:
    cost (in + out) x R^2 for a stacked rank R, never an in x out matrix)."""
    import torch

    qb, rb = torch.linalg.qr(b)  # b: out x R
    qa, ra = torch.linalg.qr(a.t())  # a^T: in x R
    u, sv, vh = torch.linalg.svd(rb @ ra.t())
    k = min(rank, sv.shape[0])
    return (qa @ vh[:k].t()).t(), qb @ (u[:, :k] * sv[:k])


VERSION_COLUMNS = "id, parent, status, reasons, objective, samples, created_at"


def _version(r: dict, active: str) -> dict:
    return {"id": r["id"], "parent": r["parent"], "status": r["status"], "active": r["id"] == active,
            "metrics": json.loads(r["metrics"] or "{}") if "metrics" in r else {},
            "reasons": json.loads(r["reasons"] or "[]"), "objective": r["objective"],
            "samples": json.loads(r["samples"] or "[]"), "created_at": r["created_at"]}


def list_versions(state: State, with_metrics: bool = True, limit: int | None = None, offset: int = 0) -> list[dict]:
    """Every version, oldest first (by number). with_metrics=False leaves each one's gate metrics unread ({}):
    the dashboard's pages show none of them, and parsing them all is most of a long history's cost on every page
    load. limit: only the newest `limit` after the newest `offset` (a page of a long history), oldest first."""
    columns = VERSION_COLUMNS + (", metrics" if with_metrics else "")
    page = " limit ? offset ?" if limit is not None else ""
    rows = state.rows(f"select {columns} from versions order by cast(substr(id, 2) as integer) desc, created_at desc, "
                      f"rowid desc{page}",
                      [int(limit), int(offset)] if limit is not None else [])
    active = state.active_version
    return [_version(r, active) for r in reversed(rows)]


def version_view(state: State, vid: str) -> dict | None:
    """One version as list_versions gives it (its gate metrics unread), or None."""
    rows = state.rows(f"select {VERSION_COLUMNS} from versions where id = ?", [vid])
    return _version(rows[0], state.active_version) if rows else None


def version_count(state: State) -> int:
    return state.conn.execute("select count(*) from versions").fetchone()[0]


def active_chain(state: State) -> set[str]:
    """The ids from v0 to the active version, in one read of the versions' parents (no query per version)."""
    parent = parents(state)
    out, cur = set(), state.active_version
    while cur and cur not in out:
        out.add(cur)
        cur = parent.get(cur)
    return out


def set_active(state: State, vid: str) -> None:
    v = get_version(state, vid)
    if v["status"] in ("corrupt", "interrupted"):
        raise UserError(f"version {vid} is {v['status']} and cannot be made active")
    if vid != "v0":
        chain_deltas(state, vid)  # verifies every adapter on the chain
    with state.conn:  # gc records what it removes in one transaction: a chain it took since is not made active
        state.conn.execute("BEGIN IMMEDIATE")
        pruned = pruned_versions(state)
        gone = [v for v in chain(state, vid) if v in pruned]
        if gone:
            raise UserError(f"version {gone[0]}'s adapter was {pruned[gone[0]]}")
        state.conn.execute("insert or replace into meta (key, value) values ('active_version', ?)", [vid])


def rollback(state: State, vid: str | None = None) -> str:
    target = vid or get_version(state, state.active_version)["parent"]
    if target is None:
        raise UserError("the active version is the base model (v0): nothing to roll back to")
    set_active(state, target)
    return target


def promote(state: State, vid: str) -> str:
    v = get_version(state, vid)
    if vid != "v0" and v["status"] not in ("corrupt", "interrupted"):
        chain_deltas(state, vid)  # every adapter on its chain loads, before the verdict is overridden
    if v["status"] in ("rejected", "candidate"):
        state.db["versions"].update(vid, {"status": "accepted", "reasons": json.dumps(
            json.loads(v["reasons"] or "[]") + ["promoted by the user"])})
    set_active(state, vid)
    return vid


def squash_version(state: State, vid: str | None = None, rank: int | None = None) -> dict:
    """A new version, child of v0, whose one adapter equals the chain to vid (exact unless rank truncates)."""
    from .lora import squash, truncate

    vid = vid or state.active_version
    deltas = chain_deltas(state, vid)
    if not deltas:
        raise UserError("nothing to squash: v0 has no adapter")
    folded = squash(deltas)
    error = 0.0
    if rank is not None:
        folded, error = truncate(folded, rank)
    new = next_version_id(state)
    src = get_version(state, vid)
    write_version(state, new, "v0", folded, {"squash_of": chain(state, vid), "truncation_error": error})
    state.db["versions"].insert({"id": new, "parent": "v0", "status": "accepted", "created_at": now(),
                                 "objective": "squash", "recipe_hash": src["recipe_hash"], "samples": src["samples"],
                                 "metrics": src["metrics"], "reasons": json.dumps([f"squash of {vid}"]),
                                 "adapter_dir": str((state.adapters / new).relative_to(state.root))})
    return {"version": new, "of": vid, "rank": folded.rank, "relative_error": error}


def export_version(state: State, vid: str, fmt: str, out: Path) -> Path:
    from .lora import export_comfyui, export_diffusers, squash

    deltas = chain_deltas(state, vid)
    if not deltas:
        raise UserError("v0 is the base model: there is no adapter to export")
    delta = deltas[0] if len(deltas) == 1 else squash(deltas)
    if fmt == "diffusers":
        return export_diffusers(delta, out)
    if fmt == "comfyui":
        return export_comfyui(delta, out)
    raise UserError(f"unknown export format {fmt!r}: diffusers or comfyui")


def diff_versions(state: State, a: str, b: str) -> dict:
    va, vb = get_version(state, a), get_version(state, b)
    sa, sb = set(_all_samples(state, a)), set(_all_samples(state, b))
    ma, mb = json.loads(va["metrics"] or "{}"), json.loads(vb["metrics"] or "{}")
    return {
        "from": a, "to": b,
        "samples_added": sorted(sb - sa), "samples_removed": sorted(sa - sb),
        "metrics": {k: {"from": ma.get(k), "to": mb.get(k)} for k in sorted(set(ma) | set(mb))
                    if isinstance(ma.get(k, 0), (int, float)) and isinstance(mb.get(k, 0), (int, float))},
    }


def _all_samples(state: State, vid: str) -> list[int]:
    out = []
    for v in chain(state, vid):
        out += json.loads(get_version(state, v)["samples"] or "[]")
    return out


def pruned_versions(state: State) -> dict[str, str]:
    """Versions whose delta retention removed: id -> why (their rows and reports stay)."""
    row = state.conn.execute("select value from meta where key='pruned_versions'").fetchone()
    return json.loads(row[0]) if row else {}
