"""From a sequence's next-token logits to its next token, the same for every engine (serving/base.py).

    logits (V,) -> constraints -> the distribution sampled from -> the token -> append_token

Constraints first: a grammar (`response_format`, tools: serving/grammar.py) allows only the tokens that keep
the output valid; `ignore_eos`, and `min_tokens` until it is reached, forbid the stop tokens of a sequence
without a grammar (with one, the grammar decides where the output ends).

The distribution sampled from is softmax(logits / temperature), cut to the nucleus (`top_p`) and renormalised
there; temperature 0 is greedy, the most likely token of softmax(logits), whose log-probabilities are the
ones reported. A token's reported log-probability is its log-probability under that distribution: after the
constraints, the temperature and top_p, so a token that could not be drawn reports -9999.0 (OpenAI's and
vLLM's value for "impossible": JSON has no -inf). Prompt tokens were not sampled: their log-probabilities
(completions' `echo`) are those of the model itself, log_softmax(logits) at temperature 1.
"""
from __future__ import annotations

import torch

from tuneforge.serving.sequence import SamplingParams, Sequence, TokenLogprob, append_token, finish

IMPOSSIBLE = -9999.0


def constrain(seq: Sequence, logits: torch.Tensor) -> torch.Tensor:
    """logits (V,) in float32 with the tokens this sequence may not choose now at -inf."""
    logits = logits.float()
    if seq.constraint is not None:
        seq.constraint.mask(logits)
    elif seq.params.ignore_eos or not seq.may_stop():
        banned = [t for t in seq.stop_ids if t < logits.shape[-1]]
        if banned and len(banned) < logits.shape[-1]:
            logits[banned] = float("-inf")
    return logits


def log_distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Log-probabilities (V,), float64, of the distribution a token is drawn from (module docstring)."""
    # In float64 and from the best logit down: a temperature as small as 5e-324 gives 0 for the best token and
    # -inf for the rest (a one-hot distribution), never 0/0 = NaN as float32 would (5e-324 rounds to 0 there).
    temperature = params.temperature if params.temperature > 0 else 1.0
    logp = torch.log_softmax((logits.double() - logits.max()) / temperature, dim=-1)
    if params.temperature > 0 and params.top_p < 1.0:
        sorted_logp, order = logp.sort(descending=True)
        probs = sorted_logp.exp()
        keep = probs.cumsum(0) - probs < params.top_p  # the smallest set reaching top_p
        keep[0] = True  # however small top_p is (5e-324 rounds to 0 in float32), the best token stays
        kept = order[keep]
        nucleus = torch.full_like(logp, float("-inf"))
        nucleus[kept] = logp[kept] - torch.logsumexp(logp[kept], 0)
        logp = nucleus
    return logp


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
           logp: torch.Tensor | None = None) -> int:
    """One token from logits (V,): greedy at temperature 0, else drawn from `log_distribution`."""
    if params.temperature <= 0:
        return int(logits.argmax())
    if logp is None:
        logp = log_distribution(logits, params)
    return int(torch.multinomial(logp.exp(), 1, generator=generator))


def _entry(token: int, logp: torch.Tensor, k: int) -> TokenLogprob:
    top = []
    if k:
        values, ids = logp.topk(min(k, logp.shape[-1]))
        top = [(int(i), max(float(v), IMPOSSIBLE)) for v, i in zip(values, ids)]
    return TokenLogprob(token, max(float(logp[token]), IMPOSSIBLE), top)


def decode_step(seq: Sequence, logits: torch.Tensor) -> None:
    """Choose the sequence's next token from its logits (V,) and append it (engine thread)."""
    logits = constrain(seq, logits)
    if seq.constraint is not None and seq.constraint.error:  # a limit of the grammar engine, hit mid-output
        finish(seq, "error", error=f"the grammar could not go on: {seq.constraint.error}")
        return
    params = seq.params
    logp = log_distribution(logits, params) if params.logprobs is not None or params.temperature > 0 else None
    token = sample(logits, params, seq.generator, logp)
    if params.logprobs is not None:
        seq.logprobs.append(_entry(token, logp, params.logprobs))
    if seq.constraint is not None and not seq.constraint.accept(token):
        finish(seq, "error", error="the grammar refused a token it allowed")  # a grammar-engine bug, never seen
        return
    append_token(seq, token)


def prompt_logprobs(logits: torch.Tensor, prompt: list[int], k: int) -> list[TokenLogprob]:
    """Each prompt token's log-probability under the model (module docstring), from the logits at every prompt
    position (L, V); the first token's is None (nothing predicts it)."""
    logp = torch.log_softmax(logits[:-1].float(), dim=-1)  # (L-1, V): position i predicts token i+1
    targets = torch.tensor(prompt[1:], dtype=torch.long, device=logp.device)
    chosen = logp.gather(1, targets[:, None])[:, 0].tolist()
    tops = logp.topk(min(k, logp.shape[-1]), dim=-1) if k else None
    out = [TokenLogprob(prompt[0], None)]
    for i, token in enumerate(prompt[1:]):
        top = list(zip(tops.indices[i].tolist(), tops.values[i].tolist())) if tops is not None else []
        out.append(TokenLogprob(token, max(chosen[i], IMPOSSIBLE), [(t, max(v, IMPOSSIBLE)) for t, v in top]))
    return out
