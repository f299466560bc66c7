"""InfiniGen (Lee et al., OSDI'24) as a KV policy on the transformers engine.

The whole KV cache lives in (pinned) CPU memory. While decoder layer i computes, layer i+1's
attention is speculated from layer i's input with a partial query and a partial key cache
(a few columns of a skewed query/key space, kept on the GPU); the tokens whose speculated
score is within `alpha` of the maximum, capped by a KV budget, are gathered and copied to the
GPU on a side stream. The first `full_layers` layers load their whole cache, as upstream.

One concern per file:
  arch.py       model-family glue (Llama-3.x / OPT): where q, norms, RoPE live
  skew.py       skewing matrices (SVD at load) and partial columns
  select.py     speculated scores -> selected tokens (pure functions)
  store.py      the host KV store (pinned, token-major) and the device buffers
  transfer.py   gather + host->device copy: side stream, events, worker thread (CPU: inline)
  cache.py      the transformers Cache the model writes into
  attention.py  the attention functions registered with transformers
  policy.py     KVPolicy: options, prepare (skew + hooks), cache, metrics
"""
