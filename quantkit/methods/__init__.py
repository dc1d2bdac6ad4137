"""Compression methods: one file each, each registering itself with :mod:`quantkit.registry`."""

from quantkit.methods import gptq, rtn  # noqa: F401
from quantkit.methods import magnitude  # noqa: F401
from quantkit.methods import sparsegpt  # noqa: F401
from quantkit.methods import wanda  # noqa: F401
from quantkit.methods import awq  # noqa: F401
from quantkit.methods import smoothquant  # noqa: F401
from quantkit.methods import asvd, svd  # noqa: F401
from quantkit.methods import rotate  # noqa: F401
