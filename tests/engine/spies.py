"""A spy on the DiT's forwards, shared by the batching tests of the engine and the bulk stage."""

from __future__ import annotations

from bagel_ray.engine.dit import DiT


def spy_forwards(dit: DiT, monkeypatch) -> list[int]:
    """The number of row blocks of every forward the DiT runs (the real forward still runs)."""
    sizes: list[int] = []
    real = dit.velocities

    def velocities(x, t, contexts, *args, **kwargs):
        sizes.append(len(contexts))
        return real(x, t, contexts, *args, **kwargs)

    monkeypatch.setattr(dit, "velocities", velocities)
    return sizes
