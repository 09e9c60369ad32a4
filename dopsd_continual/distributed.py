"""A round's training as N data-parallel processes, started by accelerate's launcher.

The round's own process (`dopsd train`, the daemon) keeps everything that writes: the round lock, the
round's row, the feature cache, the version, the gate and the verdict. Only the train phase is handed
to `accelerate launch` (torchrun underneath: NCCL on GPUs, gloo on a CPU):

    round process                                   N training processes (ranks)
    lock, recover, select, round row, features  ->  job.json: the parent version, the train settings,
    (cache files in the state dir)                  the cached feature files of new and replay samples
    pipeline waits in CPU memory ('idle')           each: load the transformer (no encoders), merge the
    polls progress.json, stop, launcher's exit      parent chain, train; rank 0 writes delta.safetensors
    version, gate, verdict                      <-  delta + result.json

Every rank draws the same global batch (train.batch x N samples) and the same global roll-out noise from
the round's seed, and takes its own slice of both; so N processes compute what one process computes with a
batch N times larger. The student adapter's float32 gradients are averaged with one all-reduce per step,
after the last roll-out step's backward (DDP's hooks cannot follow the switch between the student and the
EMA-teacher adapters inside a step; one flat all-reduce is what DDP's no_sync plus a final sync does).
Clipping, AdamW and the EMA then run on identical numbers, so every rank's student and teacher stay equal.

A rank that dies makes the launcher stop the others and exit non-zero: the round process raises, and the
round ends `interrupted` as any failed round does (no candidate, samples back in the queue). If the round
process itself dies, the launcher dies with it (PR_SET_PDEATHSIG) and the ranks stop at their next step
when they see their parent gone; the next round's recovery finds the row and cleans up, as today.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .errors import UserError
from .files import private_dirs

JOB, PROGRESS, RESULT, DELTA = "job.json", "progress.json", "result.json", "delta.safetensors"


def jobs_dir(state) -> Path:
    return state.cache / "rounds"


def gpus() -> list[str]:
    """The CUDA devices this process sees (CUDA_VISIBLE_DEVICES applies)."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def check_processes(n: int, device_type: str) -> None:
    """N processes need N GPUs on a GPU box; on a CPU they share the cores (gloo), which only tests make sense of."""
    if n < 1:
        raise UserError(f"processes must be >= 1 (got {n})")
    if device_type == "cuda" and n > 1:
        import torch

        have = torch.cuda.device_count()
        if n > have:
            raise UserError(f"train.processes = {n} but this box shows {have} GPU(s); set processes <= {have} "
                            "(or CUDA_VISIBLE_DEVICES)")


def launcher_main(parent: int, argv: list[str]) -> None:
    """`accelerate launch`, tied to the round's process: SIGKILL when that process dies (PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the ranks still stop when they see their parent gone
    if os.getppid() != parent:
        sys.exit("the round's process ended before its training processes started")
    from accelerate.commands.launch import launch_command, launch_command_parser

    launch_command(launch_command_parser().parse_args(argv))


def train_in_processes(state, job_dir: Path, job: dict, n: int, device_type: str,
                       progress: Callable[[int, int, float], None] | None = None,
                       should_stop: Callable[[], bool] | None = None):
    """Run the job on n ranks through `accelerate launch`; returns the TrainResult rank 0 wrote."""
    from .lora import Delta
    from .training import TrainResult

    if job_dir.exists():
        shutil.rmtree(job_dir)
    private_dirs(job_dir.parent)
    job_dir.mkdir(mode=0o700)
    (job_dir / JOB).write_text(json.dumps(job))
    config = {  # the launch is hermetic: a user's ~/.cache/huggingface/accelerate/default_config.yaml is not read
        "compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU", "num_processes": n, "num_machines": 1,
        "machine_rank": 0, "main_process_port": 0, "mixed_precision": "no", "gpu_ids": "all", "use_cpu": False,
        "rdzv_backend": "static", "same_network": True, "dynamo_config": {}, "debug": False,
    }
    (job_dir / "accelerate.json").write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "dopsd_continual.distributed", "--launch", str(os.getpid()),
           "--config_file", str(job_dir / "accelerate.json"),
           "--num_cpu_threads_per_process", str(max(1, (os.cpu_count() or 1) // n)),
           "-m", "dopsd_continual.distributed", str(job_dir)]
    env = {**os.environ, "DOPSD_DEVICE": device_type, "PYTHONUNBUFFERED": "1"}
    log_path = state.logs / f"round-{job_dir.name}-ranks.log"  # kept: the job folder goes at the next round
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    try:
        seen = 0
        while proc.poll() is None:
            if should_stop and should_stop():
                raise InterruptedError("round stopped")
            seen = _report(job_dir, seen, progress)
            time.sleep(0.2)
        _report(job_dir, seen, progress)
        if proc.returncode != 0 or not (job_dir / RESULT).exists():
            raise UserError(f"a training process failed: {_failure(log_path)}")
        res = json.loads((job_dir / RESULT).read_text())
        log_path.unlink(missing_ok=True)  # kept only when a rank failed
        return TrainResult(Delta.load(job_dir / DELTA), res["losses"], res["seconds"], res["samples_per_s"], res.get("seen", []))
    finally:
        if proc.poll() is None:
            _stop(proc)


def _report(job_dir: Path, seen: int, progress) -> int:
    try:
        p = json.loads((job_dir / PROGRESS).read_text())
    except (OSError, ValueError):
        return seen
    if p["step"] > seen and progress:
        progress(p["step"], p["total"], p["loss"])
    return p["step"]


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _failure(path: Path) -> str:
    """The rank that failed first (torchrun's "Root Cause") and why: its last exception, else its exit or signal."""
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return f"no log at {path}"
    cause = lines[next((i for i, ln in enumerate(lines) if ln.startswith("Root Cause")), 0):]
    field = {k: next((ln.split(":", 1)[1].strip() for ln in cause if ln.startswith(k)), None)
             for k in ("rank", "exitcode")}
    rank = field["rank"].split()[0] if field["rank"] else None
    raised = re.compile(r"^(\[rank(\d+)\]:?\s*)?[\w.]*(Error|Exception|Interrupt): ")
    found = [(m.group(2), ln) for ln in lines if (m := raised.match(ln))]
    own = [ln for r, ln in found if rank is not None and r == rank]
    if own:
        return f"rank {rank}: {own[-1].split(':', 1)[1].strip()[:300]}; the ranks' output: {path}"
    if rank is not None:
        return f"rank {rank} ended with exit code {field['exitcode']}; the ranks' output: {path}"
    return f"{found[-1][1][:300] if found else 'the launcher failed'}; the ranks' output: {path}"


# ------------------------------------------------------------------------------------------- a rank


def rank_main(job_dir: Path) -> None:
    """One rank: load the transformer, set the parent chain on it, train on the cached features, rank 0 saves."""
    from accelerate import Accelerator

    from .families import family
    from .sampling import Sampler
    from .store import atomic_write, load_compact, open_state
    from .training import train_delta

    job = json.loads((job_dir / JOB).read_text())
    acc = Accelerator(cpu=os.environ.get("DOPSD_DEVICE", "cpu") != "cuda")
    (job_dir / f"rank-{acc.process_index}.pid").write_text(str(os.getpid()))
    parent_pid = os.getppid()
    state = open_state(Path(job["state"]))
    try:
        sampler = Sampler(state, device=str(acc.device), encoders=False)
        sampler.place.use("train")
        sampler.switch.set(state, job["parent"])
        backend = family(state.recipe).backend(sampler.pipe, state.recipe, sampler.device, encoders=False)
        new = [load_compact(p) for p in job["new"]]  # the feature cache's files, as FeatureCache reads them
        replay = [load_compact(p) for p in job["replay"]]

        def progress(step: int, total: int, loss: float) -> None:
            if acc.is_main_process:
                atomic_write(job_dir / PROGRESS, json.dumps({"step": step, "total": total, "loss": loss}).encode())

        result = train_delta(backend, new, replay, job["train"], job["train"]["objective"], progress,
                             lambda: os.getppid() != parent_pid, dist=acc)
        if acc.is_main_process:
            result.delta.save(job_dir / DELTA)
            atomic_write(job_dir / RESULT, json.dumps({"losses": result.losses, "seconds": result.seconds,
                                                       "samples_per_s": result.samples_per_s, "seen": result.seen}).encode())
        acc.wait_for_everyone()
    finally:
        state.close()
        acc.end_training()


if __name__ == "__main__":
    if sys.argv[1] == "--launch":
        launcher_main(int(sys.argv[2]), sys.argv[3:])
    else:
        rank_main(Path(sys.argv[1]))
