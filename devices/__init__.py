"""Devices: where latency is measured (host, ssh, adb) or estimated (roofline).

Importing this registers them in `vcompress.core.registry.DEVICES`. The pipeline calls
`measure(artifact, device_name, profile, **overrides)`; boards run `python -m vcompress.devices.bench`.
"""
from . import adb, host, roofline, ssh  # noqa: F401  (registers the devices)
from .measure import default_device, measure, open_device

__all__ = ["measure", "open_device", "default_device"]
