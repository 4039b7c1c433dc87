"""cpt: continued pretraining of a pretrained model on fixed-length blocks of text (stage 04).
Every token is a target; every weight trains."""
from .base import Method


class ContinuedPretraining(Method):
    name = task = "cpt"
    data_kind = "cpt"
    about = "continue a pretrained model (model.path) on CPT blocks"


METHOD = ContinuedPretraining()
