"""Example loss (kind `loss`): focal cross-entropy over shifted next-token logits.

    loss(outputs, labels, num_items_in_batch=None) -> torch scalar

called the way transformers' Trainer calls `compute_loss_func`. Positions labelled -100 are
not learned; with `num_items_in_batch` (labelled tokens over the whole accumulated batch) the
summed loss is divided by it, otherwise it is the mean over this batch's labelled tokens.
`gamma=0` is plain cross-entropy; `gamma>0` down-weights tokens the model already predicts
well (Lin et al., 2017). Other settings: functools.partial, as `focal_loss_g1` below.
"""
from functools import partial

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def focal_loss(outputs, labels, num_items_in_batch=None, gamma: float = 2.0):
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
    logits = logits[:, :-1, :].float()
    target = labels[:, 1:].to(logits.device)
    mask = target != IGNORE_INDEX
    logp = F.log_softmax(logits, dim=-1)
    tok_logp = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    weight = (1.0 - tok_logp.exp()).pow(gamma) if gamma else 1.0
    per_token = -(weight * tok_logp) * mask
    if num_items_in_batch is not None:
        n = num_items_in_batch.to(logits.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
        return per_token.sum() / n
    return per_token.sum() / mask.sum().clamp_min(1)


focal_loss_g1 = partial(focal_loss, gamma=1.0)
