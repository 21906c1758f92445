"""Small-task configs whose values make no sense fail when they load, naming the key."""
from pathlib import Path

import pytest
import torch

from pcseg_kd.config import ConfigError
from pcseg_kd.engine.toy.schema import load_experiment

ROOT = Path(__file__).resolve().parents[1]
GAUSS = str(ROOT / "configs/gauss/kd.yaml")


@pytest.mark.parametrize("override,message", [
    ("model.hidden=[0]", "model: model.hidden must be a list of layer widths >= 1"),
    ("task.n_test=0", "task: task.n_train and task.n_test must be >= 1"),
    ("task.n_train=0", "task: task.n_train and task.n_test must be >= 1"),
    ("seeds.values=[1,1,1]", "seeds: seeds.values repeats one seed 3 times: that is one run"),
    ("seeds.values=[3,-1]", "seeds: seeds.values must be seeds >= 0"),
    ("seeds.start=-1", "seeds: seeds.start must be >= 0"),
    ("device=gpu", "device: must be cpu, cuda or cuda:N"),
    ("distiller.kd_weight=-1", "distiller: kd_weight must be a number >= 0"),
])
def test_bad_values_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_experiment(GAUSS, [override])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_config_error():
    with pytest.raises(ConfigError, match="'cuda' asked for, but torch sees no CUDA device"):
        load_experiment(GAUSS, ["device=cuda"])


def test_a_partly_repeated_seed_list_warns_naming_the_repeats():
    with pytest.warns(UserWarning, match=r"seeds.values repeats \[94\]"):
        load_experiment(str(ROOT / "configs/sklearn/kd.yaml"))  # the authors' list repeats 94
