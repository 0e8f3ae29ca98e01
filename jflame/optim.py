"""Per-group optimisers: one Adam per parameter group through `optax.multi_transform`.

The label tree mirrors the fit variables leaf for leaf; a group without a learning rate in a
stage is frozen with `optax.set_to_zero` (its Adam state is not even created).
"""

import optax

from jflame.config import LearningRates

def make_optimizer(rates: LearningRates, labels, steps: int) -> optax.GradientTransformation:
  """Adam per group with its schedule over `steps`; groups without a rate are frozen.

  Args:
    rates: learning rate schedule per group name.
    labels: a pytree with the structure of the variables whose leaves are group names.
    steps: the stage's iteration count, over which schedules run.
  """
  transforms = {}
  for group in rates.groups():
    schedule = getattr(rates, group)
    transforms[group] = (optax.set_to_zero() if schedule is None
                         else optax.adam(schedule.optax_schedule(steps)))
  return optax.multi_transform(transforms, labels)
