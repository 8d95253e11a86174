"""KL coefficient controllers: hand-worked update sequences and checkpoint round-trips."""

import json

import pytest
import torch

from rlhf_ray.algo import (
    FixedKLController,
    ProportionalKLController,
    StepKLController,
    make_kl_controller,
)


def run(controller, observed):
    values = []
    for kl in observed:
        controller.update(kl, n_steps=256)
        values.append(controller.value)
    return values


def test_fixed_never_changes():
    assert run(FixedKLController(0.05), [0.0, 100.0, 3.0]) == [0.05, 0.05, 0.05]


def test_proportional_sequence():
    ctl = ProportionalKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    # errors: +1 clipped to +0.2, 0, -0.5 clipped to -0.2, +0.1; step = error * 256 / 10000
    got = run(ctl, [12.0, 6.0, 3.0, 6.6])
    want = [0.100512, 0.100512, 0.09999737856, 0.09999737856 * 1.00256]
    assert got == pytest.approx(want, rel=1e-12)


def test_proportional_scales_with_n_steps():
    ctl = ProportionalKLController(0.1, target=1.0, horizon=100)
    ctl.update(2.0, n_steps=50)  # error 0.2 -> factor 1.1
    assert ctl.value == pytest.approx(0.11)


def test_step_sequence():
    ctl = StepKLController(init_kl_coef=0.2, target=1.0)
    # > 1.5 up, boundary 1.5 stays, in band stays, < 1/1.5 down, 0.6 < 0.667 down, 0.7 stays
    got = run(ctl, [2.0, 1.5, 1.0, 0.5, 0.6, 0.7])
    want = [0.3, 0.3, 0.3, 0.2, 0.2 / 1.5, 0.2 / 1.5]
    assert got == pytest.approx(want, rel=1e-12)


def test_observed_kl_may_be_a_tensor():
    ctl = StepKLController(0.2, target=1.0)
    ctl.update(torch.tensor(3.0), n_steps=1)
    assert isinstance(ctl.value, float) and ctl.value == pytest.approx(0.3)


@pytest.mark.parametrize("kind", ["fixed", "proportional", "step"])
def test_state_dict_round_trip_resumes_the_same_trajectory(kind):
    observed = [9.0, 0.5, 20.0, 0.1, 6.0]
    original = make_kl_controller(kind, init_kl_coef=0.1, target=6.0, horizon=1000)
    run(original, observed[:3])
    state = json.loads(json.dumps(original.state_dict()))  # checkpoint-serialisable
    resumed = make_kl_controller(kind, init_kl_coef=0.1, target=6.0, horizon=1000)
    resumed.load_state_dict(state)
    assert resumed.value == original.value
    assert run(resumed, observed[3:]) == run(original, observed[3:])
    if kind != "fixed":
        assert resumed.value != 0.1


def test_factory_builds_the_named_controller():
    assert type(make_kl_controller("fixed", 0.1, 6.0, 1000)) is FixedKLController
    assert type(make_kl_controller("proportional", 0.1, 6.0, 1000)) is ProportionalKLController
    step = make_kl_controller("step", 0.1, 6.0, 1000)
    assert type(step) is StepKLController and step.factor == 1.5


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match=r"'adaptive'.*fixed, proportional, step"):
        make_kl_controller("adaptive", 0.1, 6.0, 1000)
    with pytest.raises(ValueError, match="target and horizon must be > 0"):
        ProportionalKLController(0.1, target=0.0, horizon=1000)
    with pytest.raises(ValueError, match="factor > 1"):
        StepKLController(0.1, target=1.0, factor=1.0)
