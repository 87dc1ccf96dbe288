"""The paper's mathematics as pure JAX functions of ``(params, inputs)``.

``attention``: attention moments, the exact per-token Jacobian blocks, their log-determinants
and margins. ``logdet``: a log-determinant whose derivative reuses its LU factorisation.
``barrier``: the smooth log-barrier, infeasible counts and support-token selection.

Nothing here reads files, configs or Flax modules: these functions are the paper, and every
other part of stm_jax builds on them.
"""
