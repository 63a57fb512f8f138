"""Helpers to read golden cases and compare tensors the way the manifest says."""

from __future__ import annotations

from pathlib import Path


def load_case_tensors(golden_dir: Path, case: dict) -> dict:
    """All tensors of one golden case (its main file plus its KV file, if any)."""
    from safetensors.torch import load_file

    tensors = load_file(str(golden_dir / case["file"]))
    if "kv_file" in case:
        tensors.update(load_file(str(golden_dir / case["kv_file"])))
    return tensors


def assert_matches(name: str, actual, expected, compare: dict) -> None:
    """Compare one tensor the way the manifest says (exact, allclose or max_abs_int)."""
    import torch

    actual = torch.as_tensor(actual)
    assert tuple(actual.shape) == tuple(expected.shape), f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    mode = compare["mode"]
    if mode == "exact":
        assert torch.equal(actual.to(expected.dtype), expected), f"{name}: not equal"
    elif mode == "allclose":
        diff = (actual.double() - expected.double()).abs().max().item()
        assert torch.allclose(actual.double(), expected.double(), atol=compare["atol"], rtol=compare["rtol"]), (
            f"{name}: max abs diff {diff} over atol={compare['atol']} rtol={compare['rtol']}"
        )
    elif mode == "max_abs_int":
        diff = (actual.long() - expected.long()).abs().max().item()
        assert diff <= compare["max_abs"], f"{name}: max abs int diff {diff} > {compare['max_abs']}"
    else:
        raise AssertionError(f"{name}: unknown compare mode {mode}")
