"""The trainer trains what it trained before the runner/hook split, bit for bit.

``tests/golden/trainer_pin.json`` holds the final weights of a short quickstart-scale run
(teacher, no-KD baseline, online PSSM student, cached student; threads 1) recorded with the
pre-split trainer (commit 3d721c9). On a CPU of the recording's model the weights must be
bitwise equal; CPUs of other instruction sets compute the image teacher's kernels
differently (docs/training_kitti.md), so there each tensor's sum of |w| must agree to 1e-3.
"""
import json

import pytest

from kitti_common import needs_spconv
from trainer_pin import GOLDEN, cpu_model, pinned_run


@needs_spconv
def test_split_trainer_trains_the_pinned_weights(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    now = pinned_run(tmp_path)
    same_cpu = now["cpu"] == golden["cpu"] and now["torch"] == golden["torch"]
    for stage, want in golden["stages"].items():
        got = now["stages"][stage]
        assert sorted(got["abs_sums"]) == sorted(want["abs_sums"]), stage
        if same_cpu:
            assert got["sha256"] == want["sha256"], f"{stage}: weights differ from the pinned run"
            assert got["miou_in_view"] == want["miou_in_view"], stage
        else:
            for name, v in want["abs_sums"].items():
                assert got["abs_sums"][name] == pytest.approx(v, rel=1e-3, abs=1e-6), f"{stage}: {name}"
