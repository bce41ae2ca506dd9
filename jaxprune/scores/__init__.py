"""Scores: ``f(params, *, grads, acts) -> pytree`` that rank weights or structures.

Design: weight scores (magnitude, Wanda) have the params' structure; structure scores (APT
salience, outlier term, salience density) are keyed like ``models.structures``:
``{(kind, layer): f32[units]}``. The ATP pruning-decision generator is here too: a pure network
whose output logits are scores for ATP's mask groups.
"""

from jaxprune.scores._apt import apt_salience as apt_salience
from jaxprune.scores._apt import channel_salience as channel_salience
from jaxprune.scores._apt import excess_kurtosis as excess_kurtosis
from jaxprune.scores._apt import fisher_from_taps as fisher_from_taps
from jaxprune.scores._apt import outlier_scores as outlier_scores
from jaxprune.scores._apt import salience_density as salience_density
from jaxprune.scores._apt import salience_from_taps as salience_from_taps
from jaxprune.scores._atp_generator import MaskGroup as MaskGroup
from jaxprune.scores._atp_generator import generator_apply as generator_apply
from jaxprune.scores._atp_generator import generator_init as generator_init
from jaxprune.scores._atp_generator import mask_groups as mask_groups
from jaxprune.scores._magnitude import magnitude_scores as magnitude_scores
from jaxprune.scores._wanda import input_column_norms as input_column_norms
from jaxprune.scores._wanda import input_sq_norms as input_sq_norms
from jaxprune.scores._wanda import wanda_scores as wanda_scores
