"""A test-only device, "fake-board": its own settings (a required `board_id`, a `tokens_per_s`) and
latency.json figures computed from them, labelled estimated, since nothing is measured."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from vcompress.core.export_manifest import artifact_format, model_size_bytes
from vcompress.core.registry import DEVICES
from vcompress.core.units import UNIT, figure, mib
from vcompress.devices.base import LatencyDevice, Settings

KIND = "fake-board"


class FakeBoardSettings(Settings):
    board_id: str
    tokens_per_s: float = Field(100.0, gt=0, description="the decode speed the board pretends to reach")


@DEVICES.register(KIND)
class FakeBoard(LatencyDevice):
    kind = KIND
    Settings = FakeBoardSettings

    def measure(self, artifact: Path) -> dict:
        s: FakeBoardSettings = self.settings
        size = model_size_bytes(artifact)

        def estimated(value, unit, **extra):
            return figure(value, unit, measured=False, device=self.label, **extra)

        return {
            "device": self.label,
            "device_kind": self.kind,
            "board_id": s.board_id,
            "backend": artifact_format(artifact),
            "source": "estimated",
            "threads": s.threads,
            "prompt_tokens": s.prompt_tokens,
            "decode_tokens": s.decode_tokens,
            "ttft_ms": estimated(round(s.prompt_tokens / s.tokens_per_s * 1e3, 3), "ms"),
            "decode_tokens_per_s": estimated(s.tokens_per_s, "tokens/s"),
            "peak_rss_mb": estimated(mib(size, 1), UNIT, note="lower bound: the weights alone"),
            "model_size_mb": figure(mib(size), UNIT, measured=True),
        }
