"""Naive PyTorch references for every kernel in this package: the definitions the tests hold the kernels to.

Each reference builds the full [N, V] logits and lets autograd differentiate, so it is obviously right and uses
O(N x V) memory. Nothing in training calls these; they exist to be read and to be tested against.

Conventions shared with the fast paths:
- losses are computed in fp32 whatever the input dtype; a row whose label is ignore_index contributes nothing;
- reduction="mean" divides by the number of non-ignored rows, and by 1 when there are none (so an all-ignored
  batch gives a loss of 0 and zero gradients, where F.cross_entropy would give NaN);
- softcap c maps a logit z to c * tanh(z / c) before anything else (Gemma 2).
"""

import torch
import torch.nn.functional as F


def cross_entropy_reference(hidden, weight, labels, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                            z_loss=0.0, softcap=None):
    """Cross-entropy of hidden @ weight.T against labels, with label smoothing and z-loss.

    per-token loss = (1 - eps) * (lse - s_y) + eps * (lse - mean_j s_j) + z_loss * lse^2
    where s are the (softcapped) logits and lse = logsumexp(s); eps = label_smoothing (Szegedy et al. 2016, the same
    formula as F.cross_entropy's label_smoothing); the z-loss term keeps lse near 0 (PaLM, Chowdhery et al. 2022).
    """
    logits = (hidden @ weight.T).float()                                     # [N, V]
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    valid = labels != ignore_index                                           # [N]
    safe_labels = torch.where(valid, labels, 0)
    lse = torch.logsumexp(logits, dim=-1)                                    # [N]
    nll = lse - logits.gather(1, safe_labels[:, None]).squeeze(1)
    smooth = lse - logits.mean(dim=-1)
    loss = (1.0 - label_smoothing) * nll + label_smoothing * smooth + z_loss * lse * lse
    loss = torch.where(valid, loss, torch.zeros_like(loss))                  # [N]
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp(min=1)


def logprobs_reference(hidden, weight, labels, temperature=1.0, return_entropy=False):
    """log p(label) under softmax(hidden @ weight.T / temperature), and the entropy of that distribution.

    Rows whose label is -100 get log-prob 0 (their entropy is still computed).
    """
    logits = (hidden @ weight.T).float() / temperature                       # [N, V]
    logp = F.log_softmax(logits, dim=-1)                                     # [N, V]
    valid = labels != -100
    safe_labels = torch.where(valid, labels, 0)
    token_logp = logp.gather(1, safe_labels[:, None]).squeeze(1)
    token_logp = torch.where(valid, token_logp, torch.zeros_like(token_logp))  # [N]
    if not return_entropy:
        return token_logp
    entropy = -(logp.exp() * logp).sum(dim=-1)                               # [N]
    return token_logp, entropy


def kl_reference(student_hidden, student_weight, teacher_hidden, teacher_weight, mask, temperature=1.0, beta=0.5):
    """Generalised Jensen-Shannon divergence between teacher P and student Q, mean over rows where mask is true.

    JSD_beta(P, Q) = beta * KL(P || M) + (1 - beta) * KL(Q || M), with M = beta * P + (1 - beta) * Q
    (Agarwal et al. 2024, GKD). beta = 0 is defined as forward KL(P || Q), beta = 1 as reverse KL(Q || P), which is
    the convention of TRL's GKD trainer and Liger-Kernel's JSD. Both heads' logits are divided by temperature.
    """
    student = (student_hidden @ student_weight.T).float() / temperature     # [N, V]
    teacher = (teacher_hidden @ teacher_weight.T).float() / temperature     # [N, V]
    log_q = F.log_softmax(student, dim=-1)
    log_p = F.log_softmax(teacher, dim=-1)
    if beta == 0.0:
        per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    elif beta == 1.0:
        per_token = (log_q.exp() * (log_q - log_p)).sum(-1)
    else:
        log_m = torch.logaddexp(log_p + torch.log(torch.tensor(beta)), log_q + torch.log(torch.tensor(1.0 - beta)))
        kl_pm = (log_p.exp() * (log_p - log_m)).sum(-1)
        kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
        per_token = beta * kl_pm + (1.0 - beta) * kl_qm                      # [N]
    mask = mask.bool()
    per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
    return per_token.sum() / mask.sum().clamp(min=1)


def filtered_probs_reference(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """The exact distribution kernels.sample draws from, computed naively (sorting, float64), one row at a time.

    Hugging Face's order: temperature, top-k, top-p over what top-k kept (renormalised), min-p. Tie rules:
    - top-k keeps every token whose logit equals the k-th largest (as Hugging Face's TopKLogitsWarper does);
    - top-p removes a token when the probability mass of the tokens strictly more likely than it is >= top_p, so
      tied tokens are kept or removed together, and the most likely token(s) are always kept;
    - min-p removes a token whose probability is < min_p times the largest probability.
    Temperature <= 0 means greedy (all mass on the first argmax). Settings are scalars or per-row sequences.
    Returns [B, V] float64; a row holding a NaN or +inf, or no finite
    logit, is all NaN (sample returns -1 for it).
    """
    B, V = logits.shape
    per_row = lambda value, i: float(value[i]) if isinstance(value, (torch.Tensor, list, tuple)) else float(value)
    out = torch.empty(B, V, dtype=torch.float64)
    for i in range(B):
        x = logits[i].double().cpu()
        if torch.isnan(x).any() or torch.isposinf(x).any() or torch.isneginf(x).all():
            out[i] = float("nan")
            continue
        temperature_i = per_row(temperature, i)
        if temperature_i <= 0:                                               # greedy: all mass on the argmax
            out[i] = torch.nn.functional.one_hot(x.argmax(), V).double()
            continue
        s = x / temperature_i
        k = int(per_row(top_k, i))
        if 0 < k < V:
            kth = torch.sort(s, descending=True).values[k - 1]
            s = torch.where(s < kth, torch.tensor(float("-inf"), dtype=s.dtype), s)
        p = per_row(top_p, i)
        if p < 1.0:
            probs = torch.softmax(s, dim=0)
            mass_above = torch.stack([probs[s > s[j]].sum() for j in range(V)])
            remove = (mass_above >= p) & (s < s.max())
            s = torch.where(remove, torch.tensor(float("-inf"), dtype=s.dtype), s)
        mp = per_row(min_p, i)
        if mp > 0.0:
            probs = torch.softmax(s, dim=0)
            s = torch.where(probs < mp * probs.max(), torch.tensor(float("-inf"), dtype=s.dtype), s)
        out[i] = torch.softmax(s, dim=0)
    return out
