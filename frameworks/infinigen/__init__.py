"""InfiniGen (Lee et al., OSDI'24) as a KV policy on the transformers engine.

The whole KV cache lives in (pinned) CPU memory. While decoder layer i computes, layer i+1's
attention is speculated from layer i's input with a partial query and a partial key cache
(a few columns of a skewed query/key space, kept on the GPU); the tokens whose speculated
score is within `alpha` of the maximum, capped by a KV budget, are gathered on a side stream by
a GPU kernel reading the pinned host store through its unified-virtual-address alias (only the
selected rows cross PCIe). Selection keeps static shapes (budget-sized, padded and masked), so
the decode loop never waits on the device. The first `full_layers` layers load their whole
cache, as upstream. Graph decode (`decode: graph`) runs the same step on device-side positions
(cache.py), so that the engine captures it once per cache as one CUDA graph and replays it.

One concern per file:
  arch.py       model-family glue (Llama-3.x / OPT): where q, norms, RoPE live
  skew.py       skewing matrices (SVD at load) and partial columns
  select.py     speculated scores -> selected tokens (pure functions; the CPU path and the reference)
  fused.py      the same speculation as three Triton kernels + topk (the CUDA default)
  green.py      SMs of their own for the gather (CUDA green contexts)
  store.py      the host KV store (pinned, token-major, its device alias) and the device buffers
  transfer.py   gather (Triton or index_select, UVA) / full-layer copy / appends: side streams, events
  cache.py      the transformers Cache the model writes into
  attention.py  the attention functions registered with transformers
  options.py    policy keys, defaults and checks (torch-free: the host validates cells with it)
  kernels.py    the Triton gather of the selected rows (CUDA; the interpreter in the CPU tests)
  policy.py     KVPolicy: prepare (skew + hooks), cache, metrics
"""
