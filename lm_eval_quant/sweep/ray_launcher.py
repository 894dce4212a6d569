"""``--launcher ray``: every cell becomes one Ray task (``num_gpus=1`` when the cluster has GPUs,
else ``num_cpus=1``) on the cluster at ``ray.init(address=...)`` (None: a new local instance;
``auto``: the cluster ``ray start`` runs on this machine; ``ray://host:10001`` or ``host:6379``).

The task runs the same ``python -m lm_eval_quant.sweep.cell CELL_DIR`` subprocess as the local
launcher, so a cell is isolated and committed the same way; the output folder must be on a
filesystem every Ray node sees (NFS, a shared volume). The driver keeps the run log and status.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from lm_eval_quant.errors import QuantArgError
from lm_eval_quant.sweep.launch import Launch, cell_env, run_cell_subprocess

# Environment variables handed from the driver to the cell processes on the workers.
_PASS_ENV_PREFIXES = ("HF_", "LMQ_", "GPTQMODEL_", "TOKENIZERS_", "TRANSFORMERS_", "PYTHONPATH", "OMP_",
                      "MKL_", "LM_EVAL", "TORCH_")


def _driver_env() -> dict:
    env = cell_env()
    return {k: v for k, v in env.items() if k.startswith(_PASS_ENV_PREFIXES)}


def _run_remote(cell_dir: str, env_extra: dict, timeout):
    """Body of the Ray task (runs on a worker)."""
    import sys

    env = dict(os.environ)
    env.update(env_extra)
    t0 = time.time()
    rc, timed_out = run_cell_subprocess(Path(cell_dir), env=env, timeout=timeout, python=sys.executable)
    return {"rc": rc, "timed_out": timed_out, "seconds": time.time() - t0, "node": os.uname().nodename,
            "pid": os.getpid()}


def launch_ray(job: Launch, ray_address: str | None = None) -> None:
    """Run ``job.cells`` as Ray tasks (one GPU each when the cluster has GPUs)."""
    log = job.log
    try:
        import ray
    except ImportError:
        raise QuantArgError("sweep: --launcher ray needs Ray: pip install 'lm-eval-quant[ray]'") from None
    started_here = False
    if not ray.is_initialized():
        # None means a new local instance ("local"); Ray's own None would instead attach to any
        # cluster `ray start` left recorded on this machine (and hang if that one is gone)
        ray_address = ray_address or os.environ.get("RAY_ADDRESS") or None
        kw = {"address": ray_address or "local", "ignore_reinit_error": True, "log_to_driver": False}
        if not ray_address:
            kw.update(include_dashboard=False)
        try:
            ray.init(**kw)
        except ConnectionError as e:
            raise QuantArgError(f"sweep: cannot connect to the Ray cluster at {ray_address!r}: {str(e).splitlines()[0]}") from None
        started_here = True
    try:
        gpus = float(ray.cluster_resources().get("GPU", 0))
        opts = {"num_gpus": 1} if gpus >= 1 else {"num_cpus": 1}
        timeout = job.timeout
        env = _driver_env()
        # the worker process must import this package too (a checkout on PYTHONPATH, or installed)
        rt = {"env_vars": {"PYTHONPATH": env["PYTHONPATH"]}} if env.get("PYTHONPATH") else None
        remote = ray.remote(max_retries=0, runtime_env=rt, **opts)(_run_remote)
        pending = {}
        for cell in job.cells:
            cdir = job.cell_dir(cell)
            ref = remote.remote(str(cdir), env, timeout)
            pending[ref] = (cell, cdir, time.time())
            log.event("cell_start", cell=cell.name, key=cell.key, launcher="ray", resources=opts,
                      model_args=cell.model_args_string())
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                cell, cdir, t0 = pending.pop(ref)
                try:
                    out = ray.get(ref)
                    rc, timed_out, secs = out["rc"], out["timed_out"], out["seconds"]
                    where = {"worker_pid": out["pid"], "node": out["node"]}
                except Exception as e:  # noqa: BLE001  (worker died, task error): the cell failed
                    (cdir / "error.txt").write_text(f"ray task failed: {type(e).__name__}: "
                                                    f"{' '.join(str(e).split())[:300]}\n")
                    rc, timed_out, secs = 1, False, time.time() - t0
                    where = {}
                if job.bar is not None:
                    job.bar.set_postfix_str(cell.name, refresh=False)
                job.finish(cell, rc, timed_out, secs, **where)
    finally:
        if started_here:
            ray.shutdown()
