"""CLI commands, one module each; every module exposes `command`. Modules starting with _ are helpers."""
