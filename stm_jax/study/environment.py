"""What software and hardware a study ran on, for its report (no machine paths, no host names).

The devices are asked for in a child process: a parent holding a GPU client (JAX preallocates
most of the GPU's memory) would starve the training subprocesses it launches.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")
_PROBE = """
import collections, json, jax
kinds = collections.Counter(f"{d.device_kind} ({d.platform})" for d in jax.devices())
print(json.dumps({"backend": jax.default_backend(),
                  "devices": ", ".join(f"{n} x {kind}" for kind, n in kinds.items())}))
"""


def software_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def probe_devices(env: dict[str, str] | None = None, timeout_s: float = 300) -> dict[str, str]:
    """``{"backend": "gpu", "devices": "1 x NVIDIA H100 (gpu)"}`` as a child process sees it."""
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                              text=True, timeout=timeout_s)
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired) as error:
        return {"backend": "unknown", "devices": f"unknown (the device probe failed: {error})"}


def describe(env: dict[str, str] | None = None) -> dict:
    return {"versions": software_versions(),
            "hardware": {**probe_devices(env), "cpu": cpu_model(), "cpu_count": os.cpu_count()}}
