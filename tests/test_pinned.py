"""What the recipes compute is pinned: small fixed MTL, transfer, continual and adaptation
runs give the weights recorded in `tests/data/pinned.json` bit for bit (see `pinned.py`)."""

import json

import pytest

import pinned


def test_small_fixed_runs_give_the_recorded_weights_bit_for_bit():
    record = json.loads(pinned.RECORD.read_text())
    if record["fingerprint"] != pinned.fingerprint():
        pytest.skip("this platform's kernels round differently from the one the digests were recorded on")
    digests = pinned.runs()
    assert set(digests) == set(record["digests"])
    changed = sorted(k for k, v in digests.items() if v != record["digests"][k])
    assert not changed, f"weights differ from the recorded ones in: {', '.join(changed)}"
