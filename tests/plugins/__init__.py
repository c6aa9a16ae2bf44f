"""Plugins that prove the design: an exporter and a device, each one file, registered on import."""
