"""Per-group learning rates: each parameter group moves by its own rate, frozen groups not at all."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jflame.config import FULL_RATES, RIGID_RATES, Schedule
from jflame.fit import FitVariables, group_labels
from jflame.flame import FlameParams
from jflame.optim import make_optimizer

# Leaf of FitVariables -> the group whose rate must drive it.
LEAF_GROUPS = {
    ("flame", "shape"): "shape", ("flame", "expression"): "expression",
    ("flame", "global_rotation"): "global_rotation", ("flame", "neck_rotation"): "neck",
    ("flame", "jaw_rotation"): "jaw", ("flame", "left_eye_rotation"): "eyes",
    ("flame", "right_eye_rotation"): "eyes", ("camera_rotation",): "camera_rotation",
    ("camera_translation",): "camera_translation", ("focal_length",): "focal_length",
}


def _variables(value):
  flame = jax.tree.map(lambda x: x + value, FlameParams.zeros(4, 3))
  return FitVariables(flame=flame, camera_rotation=jnp.full(3, value),
                      camera_translation=jnp.full(3, value), focal_length=jnp.asarray(value))


def _leaf(tree, path):
  for name in path:
    tree = getattr(tree, name)
  return tree


def _updates_per_step(rates, steps):
  variables = _variables(1.0)
  optimizer = make_optimizer(rates, group_labels(variables), steps)
  state = optimizer.init(variables)
  grads = _variables(0.5)  # a constant gradient: every Adam step then has size ~ the rate
  history = []
  for _ in range(steps):
    updates, state = optimizer.update(grads, state, variables)
    history.append(updates)
  return history


@pytest.mark.parametrize("rates", [FULL_RATES, RIGID_RATES], ids=["full", "rigid"])
def test_each_group_moves_by_its_own_rate(rates):
  steps = 10
  history = _updates_per_step(rates, steps)
  for path, group in LEAF_GROUPS.items():
    schedule = getattr(rates, group)
    first, last = _leaf(history[0], path), _leaf(history[-1], path)
    if schedule is None:
      np.testing.assert_array_equal(first, 0.0, err_msg=f"{path} should be frozen")
      continue
    end = schedule.start if schedule.end is None else schedule.end
    expected_last = schedule.start + (end - schedule.start) * (steps - 1) / steps
    np.testing.assert_allclose(-first, schedule.start, rtol=1e-4, err_msg=str(path))
    np.testing.assert_allclose(-last, expected_last, rtol=1e-4, err_msg=str(path))


def test_default_rates_follow_the_seed_table():
  assert FULL_RATES.expression == Schedule(0.01, 0.005)
  assert FULL_RATES.jaw == Schedule(0.025, 0.01)
  assert FULL_RATES.eyes == Schedule(0.03, 0.01)
  assert FULL_RATES.shape == Schedule(0.001)
  assert FULL_RATES.texture == Schedule(0.005) and FULL_RATES.lighting == Schedule(0.005)
  # The groups really do differ, so a mix-up of labels would be visible above.
  starts = {FULL_RATES.shape.start, FULL_RATES.expression.start, FULL_RATES.jaw.start,
            FULL_RATES.eyes.start, FULL_RATES.camera_rotation.start}
  assert len(starts) == 5


def test_swapped_labels_are_caught():
  """The check above is sharp: wiring expression to the jaw's optimiser changes the step."""
  variables = _variables(1.0)
  labels = group_labels(variables)
  wrong = labels.replace(flame=labels.flame.replace(expression="jaw"))
  optimizer = make_optimizer(FULL_RATES, wrong, 10)
  updates, _ = optimizer.update(_variables(0.5), optimizer.init(variables), variables)
  assert not np.allclose(-updates.flame.expression, FULL_RATES.expression.start, rtol=1e-4)


def test_a_step_with_a_finite_loss_but_a_non_finite_gradient_is_refused():
  """run_stage keeps an image still, and marks it failed, when a step's gradient is not finite
  even though its loss is (sqrt(|x|) at 0: loss 0, gradient NaN); a healthy image in the same
  batch moves on. An update made of NaN must never reach the variables."""
  from jflame.fit import run_stage

  def loss_fn(variables):
    # Healthy where expression[0] starts away from 0; its gradient is NaN where it starts at 0.
    e = variables.flame.expression
    return jnp.sqrt(jnp.abs(e[0])) + jnp.sum((variables.flame.shape - 1.0) ** 2)

  def one(start):
    return run_stage(loss_fn, _variables(0.0).replace(
        flame=_variables(0.0).flame.replace(expression=jnp.asarray([start, 0.0, 0.0]))),
        FULL_RATES, 5, jnp.asarray(True))

  variables, history, failed = jax.vmap(one)(jnp.asarray([0.0, 0.5]))
  assert bool(failed[0]) and not bool(failed[1])
  for leaf in jax.tree.leaves(variables):
    assert np.all(np.isfinite(np.asarray(leaf)))
  np.testing.assert_array_equal(np.asarray(variables.flame.shape[0]), 0.0)  # never moved
  assert np.all(np.asarray(variables.flame.shape[1]) > 0.0)  # the healthy one did
  assert np.all(np.isfinite(np.asarray(history[1])))
