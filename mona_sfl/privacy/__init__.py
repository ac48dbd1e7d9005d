"""Privacy: the model-inversion attack an honest-but-curious server can run on the smashed data."""

from mona_sfl.privacy import attack as _attack
from mona_sfl.privacy.attack import *  # noqa: F403 - the package face is the attack module's API

__all__ = list(_attack.__all__)
