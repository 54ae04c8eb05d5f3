"""ID interest modules (user-behaviour models) behind one seam: ``build_ubm(name, dim, **options)``.

Importing the package registers every model: avg, din, dien, bst, sim, twin.
"""

from mim_rec.ubm.base import InterestModule, available_ubms, build_ubm, register_ubm
from mim_rec.ubm import avg, bst, dien, din, sim, twin  # noqa: F401  (registration)

__all__ = ["InterestModule", "available_ubms", "build_ubm", "register_ubm"]
