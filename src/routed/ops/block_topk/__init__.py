"""Kernels of the trained block routers (:mod:`routed.routers.blocks`).

* :func:`~routed.ops.block_topk.triton_kernels.nsa_compressed_mass_triton` -- NSA's selection
  scores: the compressed-attention probabilities of every query block, summed over its queries
  and the query heads of a KV group, per compressed block, in one pass (no ``q_len x
  num_compressed`` tensor is written). Plain-PyTorch twin: ``routed.routers.blocks._nsa_mass_torch``.
* :func:`~routed.ops.block_topk.triton_kernels.block_topk_triton` -- the top-k route of a score
  matrix (causal window, sinks, local window, optional GQA group reduction and MoBA's candidate
  renormalisation) in one launch. Plain-PyTorch twin: ``routed.routers.blocks.block_topk_route``.
"""
