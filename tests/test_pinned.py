"""What the recipes compute is pinned: small fixed MTL, transfer, continual and adaptation
runs give the weights recorded in `tests/data/pinned.json` for this platform bit for bit
(see `pinned.py`; one record per platform whose kernels round alike)."""

import json

import pytest

import pinned


def test_small_fixed_runs_give_the_recorded_weights_bit_for_bit():
    platforms = json.loads(pinned.RECORD.read_text())["platforms"]
    here = pinned.fingerprint()
    if here not in platforms:
        pytest.skip(f"no digests recorded for this platform ({here[:12]}; recorded: "
                    f"{', '.join(p[:12] for p in platforms)}): `python tests/pinned.py --record COMMIT` adds them")
    recorded = platforms[here]["digests"]
    digests = pinned.runs()
    assert set(digests) == set(recorded)
    changed = sorted(k for k, v in digests.items() if v != recorded[k])
    assert not changed, f"weights differ from the recorded ones in: {', '.join(changed)}"
