"""Schedules that optax lacks: APT's pruning cadence, stepwise cubic density, tuning growth and
the distillation weight. A cubic density is ``optax.polynomial_schedule(power=3)`` underneath.
"""

from jaxprune.schedules._apt import cubic_density as cubic_density
from jaxprune.schedules._apt import distill_start as distill_start
from jaxprune.schedules._apt import distill_weight as distill_weight
from jaxprune.schedules._apt import pruning_steps as pruning_steps
from jaxprune.schedules._apt import stepwise_density as stepwise_density
from jaxprune.schedules._apt import tuning_growth as tuning_growth
