"""ClientApp mods: ``ClientApp(mods=[...])`` or ``@app.train(mods=[...])``."""

from flower_ext.secagg.mod import secagg_mod

from .attack import AttackMod, attack_mod, training_labels
from .dp import UpdateDPMod, update_dp_mod
from .he import HEMod, he_mod
from .topk import TopKMod, topk_mod

__all__ = [
    "AttackMod",
    "HEMod",
    "TopKMod",
    "UpdateDPMod",
    "attack_mod",
    "he_mod",
    "secagg_mod",
    "topk_mod",
    "training_labels",
    "update_dp_mod",
]
