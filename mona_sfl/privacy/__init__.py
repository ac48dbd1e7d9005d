"""Privacy: the model-inversion attack an honest-but-curious server can run on the smashed data."""

from mona_sfl.privacy.attack import (
    AttackResult,
    Decoder,
    ResBlock,
    attack_config,
    attack_front,
    attack_main,
    attack_run,
    aux_indices,
    upsampling_stages,
)

__all__ = [
    "AttackResult",
    "Decoder",
    "ResBlock",
    "attack_config",
    "attack_front",
    "attack_main",
    "attack_run",
    "aux_indices",
    "upsampling_stages",
]
