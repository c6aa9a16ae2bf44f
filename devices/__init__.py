"""Devices: where latency is measured (host, ssh, adb) or estimated (roofline).

Importing this registers every device module in `vcompress.core.registry.DEVICES`, so a new device is
one file. The pipeline calls `measure(artifact, device_name, profile, **overrides)`; host and ssh
boards run devices/bench.py by path (see `base.bench_command`).
"""

import importlib
import pkgutil

SCRIPT = "bench"  # the measuring process, run by path: imported here, `python -m` would load it twice
PROBE = "isa_probe"  # the emulated device's answering process, run by path like the bench
NOT_DEVICES = {SCRIPT, PROBE, "calibration"}  # calibration: data and a `python -m` table, registers no device

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_") and _info.name not in NOT_DEVICES:
        importlib.import_module(f"{__name__}.{_info.name}")

from .emulated import target_isa_device  # noqa: E402
from .measure import default_device, measure, measure_on, open_device  # noqa: E402

__all__ = ["measure", "measure_on", "open_device", "default_device", "target_isa_device"]
