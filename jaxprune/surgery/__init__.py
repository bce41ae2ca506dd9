"""Surgery: physically remove pruned structures, outside ``jit``.

Design: surgery is data-driven by ``jaxprune.models.structures`` (which parameter slices each
head group, FFN neuron and hidden dim owns), so one pure function prunes params, optimizer state
(``prune_like``) and unit-layout state such as APT masks and salience EMAs (``prune_units``).
The invariant tested for every model: the pruned model's outputs equal the masked model's.
A structure pruned completely keeps one zeroed unit (configs need >= 1 unit per layer).
LoRA rank changes are a separate step (``jaxprune.lora._grow``).

What a config cannot express (ATP/DISP per-layer input/output dims and single value-head dims)
is cut by ``compact`` into a plain pytree of sliced kernels and ``int32`` index arrays, run by
``compact_forward`` and stored by ``save_compact`` / ``load_compact`` as a folder with
``model.safetensors`` + ``jaxprune_compact.json`` (``jaxprune train`` with ``prune.method: atp``
writes one to ``<run_dir>/pruned``).
"""

from jaxprune.surgery._compact_io import load_compact as load_compact
from jaxprune.surgery._compact_io import save_compact as save_compact
from jaxprune.surgery._dims import compact as compact
from jaxprune.surgery._dims import compact_forward as compact_forward
from jaxprune.surgery._prune import effective_keep as effective_keep
from jaxprune.surgery._prune import prune as prune
from jaxprune.surgery._prune import prune_like as prune_like
from jaxprune.surgery._prune import prune_model as prune_model
from jaxprune.surgery._prune import prune_units as prune_units
from jaxprune.surgery._prune import pruned_config as pruned_config
from jaxprune.surgery._prune import rebuild_model as rebuild_model
