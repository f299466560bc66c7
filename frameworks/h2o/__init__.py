"""Framework `h2o`: H2O heavy-hitter eviction (Zhang et al., NeurIPS'23) on the transformers engine.

Every cached token carries its accumulated attention score (the attention probability it has
received from every query so far); a layer keeps, per sequence and per KV head, the `heavy`
tokens of highest score plus the `recent` most recent tokens, and drops the rest for good.

    budget.py     how many tokens are kept (heavy / recent, from ratios or sizes)
    cache.py      the per-layer cache: fixed slots, scores, eviction
    attention.py  attention functions that also return the scores (eager, chunked, decode)
    policy.py     the KVPolicy gluing them to the engine
    adapter.py    run(spec)
"""
