"""Orders read from the analysis's scores, shared by the analysis, the fixed prune and the prune planner."""

from __future__ import annotations


def least_important_layers(scores: dict) -> list[int]:
    """Layers ordered by the loss change when skipped, smallest first (ties: lower angular distance)."""
    layers = scores["layers"]
    return sorted(
        range(len(layers["skip_loss_delta_nats"])), key=lambda i: (layers["skip_loss_delta_nats"][i], layers["angular_distance"][i], i)
    )
