"""What an entry records of where it came from: the package version and commit, the device self-check it ran
after, the data files' hashes, the model's weights, the machine, and when (``schema.Provenance``)."""
from __future__ import annotations

import functools
import os
import platform
import subprocess
from datetime import datetime, timezone

import torch
import transformers

from cfsam import __version__
from cfsam.core.errors import RunFailed
from cfsam.core.io import read_json
from cfsam.data import models
from cfsam.pipeline.cache import REPO, data_hashes


@functools.lru_cache(maxsize=1)
def code_version() -> dict:
    """The commit (and whether tracked files differed from it) of the code this process runs: read once,
    at its first experiment, so that commits made while a long ``run-missing`` runs are not credited."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    if os.environ.get("CFSAM_GIT_COMMIT"):
        # a staged copy (a cluster's, an accelerator's): its sender names the commit it copied, and whether
        # tracked files differed from it (CFSAM_GIT_DIRTY=1), since the copy's own .git may be missing or older
        return {"git_commit": os.environ["CFSAM_GIT_COMMIT"], "git_dirty": os.environ.get("CFSAM_GIT_DIRTY") == "1",
                "git_from": "CFSAM_GIT_COMMIT"}
    return {"git_commit": git("rev-parse", "HEAD"),
            "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def device_check() -> dict:
    """The device self-check this process runs after (``cfsam.measurement.selfcheck``; scripts/offline_gpu):
    the result file that CFSAM_DEVICE_CHECK names, for provenance; a failed or unreadable one stops the run."""
    path = os.environ.get("CFSAM_DEVICE_CHECK")
    if not path:
        return {}
    try:
        result = read_json(path)
    except (OSError, ValueError) as err:
        raise RunFailed(f"CFSAM_DEVICE_CHECK={path} cannot be read ({type(err).__name__}: {err}); run "
                           "`python -m cfsam.measurement.selfcheck results/cpu/base.json.gz --out FILE` first") from err
    if not result.get("passed"):
        raise RunFailed(f"the device self-check in {path} failed ({'; '.join(result.get('failures', [])[:3])}): "
                           "this machine does not reproduce the committed reference, so nothing is computed")
    return {"device_check": result}


def provenance(started: float, ended: float, exp: dict, model=None) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cfsam_version": __version__, **code_version(), **device_check(),
        "data": data_hashes(exp),
        "model_weights_hash": models.weights_hash(model) if model is not None else None,
        "machine": {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"},
        "start": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
        "end": datetime.fromtimestamp(ended, timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(ended - started, 1),
    }


# ---------------------------------------------------------------------------------- experiments
