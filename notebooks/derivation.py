# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The attention Jacobian, step by step
#
# This notebook checks the mathematics of `docs/math.md` (sections 1-4) numerically on a
# small random layer: the closed forms in `stm_jax.core.attention` and `stm_jax.core.barrier`
# against autodiff oracles (`jax.jacfwd`, `numpy.linalg`). Every claim is an `assert`; nothing is a
# number copied from an earlier run. Float64 throughout; the closed forms are asserted to
# agree with the oracles to 1e-9.
#
# The model: one causal self-attention layer with $H$ heads of width $p$ acting on
# $u_1, \dots, u_T \in \mathbb{R}^d$,
#
# $$q_t^h = W_Q^h u_t,\quad k_s^h = W_K^h u_s,\quad v_s^h = W_V^h u_s,\quad
#   a_{ts}^h = \operatorname{softmax}_{s \le t}\big(q_t^h \cdot k_s^h / \sqrt{p}\big),$$
#
# $$o_t^h = \sum_{s \le t} a_{ts}^h v_s^h,\qquad \mu_t(u) = \sum_h W_O^h o_t^h,\qquad
#   e_t = u_t - \mu_t(u).$$
#
# Read probabilistically, $u_t = \mu_t(u_{\le t}) + \varepsilon_t$ with Gaussian noise, and the
# density of $u$ is the noise density times $|\det \partial e / \partial u|$.

# %%
import functools

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from stm_jax.core import attention, barrier

# %% [markdown]
# ## 1. A small random layer
#
# $d = 6$, $H = 2$, $p = 3$, $T = 5$. `init_attention_params` draws Gaussian weights with
# standard deviation `scale / sqrt(fan_in)`; `scale = 2` is large enough that some tokens
# have $\det J_t < 0$: they are on the wrong side of the degeneracy boundary.

# %%
D, HEADS, HEAD_DIM, TOKENS = 6, 2, 3, 5
key_params, key_input = jax.random.split(jax.random.PRNGKey(0))
params = attention.init_attention_params(key_params, D, HEADS, HEAD_DIM, scale=2.0,
                                         dtype=jnp.float64)
u = jax.random.normal(key_input, (TOKENS, D), jnp.float64)
{name: w.shape for name, w in params.items()}

# %%
out, stats = attention.causal_self_attention(params, u, scope="both")
print("sign det J_t:", stats.sign)
assert np.any(stats.sign < 0) and np.any(stats.sign > 0)

# %% [markdown]
# ## 2. The full Jacobian is block lower-triangular
#
# The residual map $F: u \mapsto e$ sends $\mathbb{R}^{T d}$ to itself. Because $e_t$ depends
# on $u_{\le t}$ only (causal mask), the blocks $\partial e_t / \partial u_s$ vanish for
# $s > t$ and
#
# $$\det \frac{\partial F}{\partial u} = \prod_t \det J_t,\qquad
#   J_t = \frac{\partial e_t}{\partial u_t} \in \mathbb{R}^{d \times d}.$$
#
# The oracle is `jax.jacfwd` of $F$, reshaped from $(T, d, T, d)$ to $(Td) \times (Td)$.


# %%
def residual_map(params, head=None):
    """e = u - attention(u): all heads, or head `head` acting alone."""
    return lambda u: attention.residual(params, u, head)


full_jacobian = jax.jit(lambda u: jax.jacfwd(residual_map(params))(u))
jac4 = np.asarray(full_jacobian(u))  # (T, d, T, d): d e_t[i] / d u_s[j]
jac = jac4.reshape(TOKENS * D, TOKENS * D)
for t in range(TOKENS):
    for s in range(t + 1, TOKENS):
        assert np.all(jac4[t, :, s, :] == 0.0), (t, s)  # exactly zero, not just small
assert all(np.any(jac4[t, :, s, :] != 0) for t in range(TOKENS) for s in range(t))
print("blocks (t, s) with s > t are exactly zero; those with s < t are not")

# %%
fig, ax = plt.subplots(figsize=(4.5, 4))
image = ax.imshow(np.abs(jac), cmap="magma")
for edge in np.arange(1, TOKENS) * D - 0.5:
    ax.axhline(edge, color="w", lw=0.8)
    ax.axvline(edge, color="w", lw=0.8)
ax.set(title=r"$|\partial e / \partial u|$, blocks $(t, s)$", xlabel="input $u_s$",
       ylabel="residual $e_t$")
fig.colorbar(image, ax=ax)
plt.show()

# %% [markdown]
# ## 3. Closed-form log-determinants ("layer" scope)
#
# With $C_t^h = \sum_{s \le t} a_{ts}^h (v_s^h - o_t^h)(k_s^h - \bar k_t^h)^\top$ and
# $\bar k_t^h = \sum_s a_{ts}^h k_s^h$, differentiating through the query, and through the
# key and value of the token itself (the self-term $s = t$):
#
# $$\frac{\partial o_t^h}{\partial u_t} = G_t^h =
#   \frac{C_t^h W_Q^h + a_{tt}^h (v_t^h - o_t^h)(q_t^h)^\top W_K^h}{\sqrt p} + a_{tt}^h W_V^h,
#   \qquad J_t = I_d - \sum_h W_O^h G_t^h.$$
#
# Sylvester's identity $\det(I_d - UG) = \det(I_{Hp} - GU)$ turns this into an $Hp \times Hp$
# determinant built from the $p \times p$ products $W_X^h W_O^g$. `causal_self_attention`
# returns $\log|\det J_t|$ and its sign; the oracle is `slogdet` of the diagonal blocks of
# the autodiff Jacobian.

# %%
blocks = np.einsum("tdte->tde", jac4)  # the diagonal blocks J_t, (T, d, d)
oracle_sign, oracle_logdet = np.linalg.slogdet(blocks)
np.testing.assert_allclose(stats.logdet, oracle_logdet, atol=1e-9, rtol=0)
np.testing.assert_array_equal(stats.sign, oracle_sign)
print("closed form:", np.round(stats.logdet, 6))
print("autodiff:   ", np.round(oracle_logdet, 6))

# %% [markdown]
# The log-determinant of the whole $(Td) \times (Td)$ Jacobian is the sum of the per-token
# ones, and its sign the product of theirs: the off-diagonal blocks never enter the density.

# %%
full_sign, full_logdet = np.linalg.slogdet(jac)
assert np.isclose(full_logdet, np.sum(stats.logdet), atol=1e-9, rtol=0)
assert full_sign == np.prod(stats.sign)
print(f"log|det dF/du| = {full_logdet:.9f},  sum_t log|det J_t| = {np.sum(stats.logdet):.9f}")

# %% [markdown]
# ## 4. "Head" scope
#
# The head scope keeps only the diagonal blocks $h = g$ of the Sylvester matrix:
# $\sum_h \log|\det(I_p - B_t^{hh})|$, and $\det(I_p - B_t^{hh}) = \det(I_d - W_O^h G_t^h)$ is
# the Jacobian determinant of head $h$ acting alone, $e^h_t = u_t - W_O^h o_t^h$. The oracle
# is `jacfwd` of that single-head residual map.

# %%
head_blocks = []
for h in range(HEADS):
    head_jac4 = jax.jacfwd(residual_map(params, head=h))(u)
    head_blocks.append(np.einsum("tdte->tde", np.asarray(head_jac4)))
    head_sign, head_logdet = np.linalg.slogdet(head_blocks[h])
    np.testing.assert_allclose(stats.head_logdet[h], head_logdet, atol=1e-9, rtol=0)
    np.testing.assert_array_equal(stats.head_sign[h], head_sign)
head_blocks = np.stack(head_blocks)  # (H, T, d, d)
print("per-head log|det|:\n", np.round(stats.head_logdet, 6))

# %% [markdown]
# **Head scope is the layer scope only when $H = 1$.** With two heads the cross-head blocks
# $B_t^{hg}$, $h \ne g$, are dropped, so $\sum_h \log|\det(I - B_t^{hh})| \ne \log|\det J_t|$
# in general: the head scope is the log-determinant a layer would have if its heads acted one
# after another, a cheaper surrogate rather than the density's Jacobian.

# %%
head_sum = np.sum(stats.head_logdet, axis=0)
print("sum over heads:", np.round(head_sum, 6))
print("layer scope:   ", np.round(stats.logdet, 6))
assert np.max(np.abs(head_sum - stats.logdet)) > 1e-3  # they differ for H = 2

# With a single head (keep head 0 only) the two scopes coincide.
params_1 = {name: w[:, :1] if name != "wo" else w[:1] for name, w in params.items()}
_, stats_1 = attention.causal_self_attention(params_1, u, scope="both")
np.testing.assert_allclose(stats_1.head_logdet[0], stats_1.logdet, atol=1e-12, rtol=0)
np.testing.assert_array_equal(stats_1.head_sign[0], stats_1.sign)

# %% [markdown]
# ## 5. Margins to degeneracy
#
# The margin of token $t$ is $m_t = \sigma_{\min}(J_t)$. By Eckart-Young it is the distance,
# in operator norm, from $J_t$ to the nearest singular matrix: with the SVD
# $J_t = \sum_i \sigma_i u_i v_i^\top$, the matrix $J_t - \sigma_{\min} u_{\min} v_{\min}^\top$ is
# singular, and (Weyl) no perturbation of norm $< \sigma_{\min}$ is. `attention.margins`
# computes $m_t$ without forming the autodiff Jacobian; the oracle is the SVD of the blocks.

# %%
layer_margins = np.asarray(attention.margins(params, u, scope="layer"))
head_margins = np.asarray(attention.margins(params, u, scope="head"))
np.testing.assert_allclose(layer_margins, np.linalg.svd(blocks, compute_uv=False)[:, -1],
                           atol=1e-9, rtol=0)
np.testing.assert_allclose(head_margins, np.linalg.svd(head_blocks, compute_uv=False)[..., -1],
                           atol=1e-9, rtol=0)
print("layer margins:", np.round(layer_margins, 6))
print("head margins:\n", np.round(head_margins, 6))

# %%
rng = np.random.default_rng(0)
for t in range(TOKENS):
    left, singular, right_t = np.linalg.svd(blocks[t])
    nearest = blocks[t] - singular[-1] * np.outer(left[:, -1], right_t[-1])
    assert np.isclose(np.linalg.norm(blocks[t] - nearest, ord=2), layer_margins[t])
    assert abs(np.linalg.det(nearest)) < 1e-12 * np.prod(singular[:-1])  # singular
    # A random rank-one perturbation of norm 0.99 m_t leaves J_t invertible (Weyl).
    a, b = rng.normal(size=(2, D))
    small = 0.99 * layer_margins[t] * np.outer(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))
    assert np.linalg.svd(blocks[t] - small, compute_uv=False)[-1] >= 0.01 * layer_margins[t] - 1e-12
print("J_t - m_t u v^T is singular for every token")

# %% [markdown]
# ## 6. The smooth log-barrier near the boundary
#
# The barrier constraint is $\det J_t > 0$. The per-token barrier is $b(x) = -\log x$ for
# $x = \det J_t \ge \varepsilon$, continued below $\varepsilon$ by the $C^2$ quadratic
#
# $$b(x) = -\log\varepsilon - \frac{x - \varepsilon}{\varepsilon}
#          + \frac{(x - \varepsilon)^2}{2\varepsilon^2},$$
#
# and for $x < -1$ linearly in $\log|x|$ (so a huge negative determinant still gives a finite
# value and a bounded gradient). It is decreasing everywhere, so its gradient always pushes
# toward the feasible side, and it is finite at $x = 0$, where $-\log x$ is not.

# %%
# 1200 points: the grid misses x = -1 exactly, where the autodiff slope of `barrier_of_det`
# is halved by a `jnp.clip` tie (a one-point artefact, reported upstream).
xs = jnp.linspace(-3.0, 3.0, 1200)
fig, (ax_b, ax_db) = plt.subplots(1, 2, figsize=(10, 3.5))
positive = xs > 0
ax_b.plot(xs[positive], -jnp.log(xs[positive]), "k--", lw=1, label=r"$-\log x$")
ax_db.plot(xs[positive], -1 / xs[positive], "k--", lw=1, label=r"$-1/x$")
for eps in (0.1, 0.5):
    b = functools.partial(barrier.barrier_of_det, eps=eps)
    values, slopes = b(xs), jax.vmap(jax.grad(b))(xs)
    assert np.all(np.diff(np.asarray(values)) < 0) and np.all(np.asarray(slopes) < 0)
    assert np.all(np.isfinite(values)) and np.all(np.isfinite(slopes))
    step = 1e-6  # autodiff slope against central differences
    central = (b(xs + step) - b(xs - step)) / (2 * step)
    np.testing.assert_allclose(slopes, central, rtol=1e-5)
    above = xs >= eps
    np.testing.assert_allclose(values[above], -jnp.log(xs[above]), rtol=1e-12)
    # The slogdet form used in training agrees with the plain-determinant form.
    from_slogdet = barrier.smooth_log_barrier(jnp.sign(xs), jnp.log(jnp.abs(xs)), eps)
    np.testing.assert_allclose(from_slogdet, values, rtol=1e-12)
    at_zero, slope_at_zero = jax.value_and_grad(b)(0.0)
    assert np.isclose(at_zero, -np.log(eps) + 1.5) and np.isclose(slope_at_zero, -2 / eps)
    ax_b.plot(xs, values, label=rf"$b(x)$, $\varepsilon = {eps}$")
    ax_db.plot(xs, slopes, label=rf"$b'(x)$, $\varepsilon = {eps}$")
ax_b.set(ylim=(-2, 12), xlabel=r"$x = \det J_t$", title="barrier")
ax_db.set(ylim=(-40, 2), xlabel=r"$x = \det J_t$", title="derivative")
for ax in (ax_b, ax_db):
    ax.axvline(0, color="grey", lw=0.5)
    ax.legend()
plt.show()

# %% [markdown]
# ## 7. Projectivity (Kolmogorov consistency)
#
# Causal masking makes the length-$n$ laws projective: the outputs, per-token log-dets and
# margins of positions $t \le n$ are the same whether computed on the prefix $u_{1:n}$ or on
# any extension. With the barrier satisfied every conditional $u_t \mid u_{<t}$ is a proper
# density, and the finite-dimensional laws extend to one process (Ionescu-Tulcea). Check on
# an extension of the sequence to length 12.


# %%
@jax.jit
def everything(u):
    out, stats = attention.causal_self_attention(params, u, scope="both")
    return out, stats, attention.margins(params, u), attention.margins(params, u, scope="head")


extra = jax.random.normal(jax.random.PRNGKey(1), (7, D), jnp.float64)
long_u = jnp.concatenate([u, extra])  # starts with the same 5 tokens
long_out, long_stats, long_margins, long_head_margins = everything(long_u)
for n in (1, 3, 5, 8, 11):
    out_n, stats_n, margins_n, head_margins_n = everything(long_u[:n])
    np.testing.assert_allclose(out_n, long_out[:n], atol=1e-12, rtol=0)
    np.testing.assert_allclose(stats_n.logdet, long_stats.logdet[:n], atol=1e-12, rtol=0)
    np.testing.assert_array_equal(stats_n.sign, long_stats.sign[:n])
    np.testing.assert_allclose(stats_n.head_logdet, long_stats.head_logdet[:, :n], atol=1e-12,
                               rtol=0)
    np.testing.assert_allclose(margins_n, long_margins[:n], atol=1e-12, rtol=0)
    np.testing.assert_allclose(head_margins_n, long_head_margins[:, :n], atol=1e-12, rtol=0)
np.testing.assert_allclose(long_stats.logdet[:TOKENS], stats.logdet, atol=1e-12, rtol=0)
print("prefix statistics unchanged by the extension")

# %% [markdown]
# ## 8. Support tokens
#
# The log-barrier's gradient concentrates on the tokens nearest the boundary, as an SVM's
# solution rests on the vectors on its margin. The **support tokens** of a sequence are the
# $k$ tokens with the smallest margins (`support_tokens_bottom_k`; a threshold $m_t \le \tau$
# is also offered). Here: $k = 5$ of a random sequence of 40 tokens; infeasible tokens
# ($\det J_t < 0$) are hatched.

# %%
K = 5
seq = jax.random.normal(jax.random.PRNGKey(2), (40, D), jnp.float64)
_, seq_stats, seq_margins, _ = everything(seq)
indices, mask = barrier.support_tokens_bottom_k(seq_margins, K)
indices, mask, seq_margins = np.asarray(indices), np.asarray(mask), np.asarray(seq_margins)
np.testing.assert_array_equal(np.sort(indices), np.sort(np.argsort(seq_margins)[:K]))
assert mask.sum() == K and seq_margins[mask].max() <= seq_margins[~mask].min()

fig, ax = plt.subplots(figsize=(10, 3))
bars = ax.bar(np.arange(len(seq_margins)), seq_margins,
              color=np.where(mask, "tab:red", "tab:blue"))
for bar, negative in zip(bars, np.asarray(seq_stats.sign) < 0, strict=True):
    if negative:
        bar.set_hatch("//")
ax.set(xlabel="token t", ylabel=r"margin $m_t = \sigma_{\min}(J_t)$",
       title=f"support tokens: the {K} smallest margins (red); hatched: det $J_t$ < 0")
plt.show()
print("support tokens:", sorted(indices.tolist()))

# %% [markdown]
# ## 9. The embedding prior: a strictly causal attention over the raw embeddings
#
# The port's reading attaches the barrier to a separate prior over the layer-0 embeddings
# $x^0_t$ (`docs/math.md` section 9): latents $u_t = x^0_t P$, weights
# $a_{ts} = \operatorname{softmax}_{s<t}(u_t A u_s^\top)$ with $A = W_Q W_K^\top/\sqrt{p}$, and
# the latents themselves as values, $\mu_t = \sum_{s<t} a_{ts} u_s$. Only the weights depend
# on $u_t$, through the query, so
#
# $$J_t = \frac{\partial e_t}{\partial u_t} = I_p - \Sigma_t A^\top,\qquad
#   \Sigma_t = \sum_{s<t} a_{ts} (u_s - \bar u_t)(u_s - \bar u_t)^\top,$$
#
# with $J_1 = I$ (no past, $\mu_1 = 0$). Check the closed form against `jax.jacfwd` of the
# residual map, with a projection to $p = 3$ of $d = 5$, at a scale where some determinants
# are negative.

# %%
from stm_jax.core import penalties, prior

prior_params = prior.init_prior_params(jax.random.PRNGKey(2), 5, 3, project=True,
                                       dtype=jnp.float64)
prior_params = {name: 3.0 * value for name, value in prior_params.items()}
x0 = jax.random.normal(jax.random.PRNGKey(13), (7, 5), jnp.float64)
latent = prior.latents(prior_params, x0)
unprojected = {name: value for name, value in prior_params.items() if name != "proj"}
prior_jacobian = jax.jacfwd(lambda v: prior.prior_residual(unprojected, v))(latent)
prior_blocks = np.stack([np.asarray(prior_jacobian[t, :, t, :]) for t in range(7)])
prior_closed = prior.prior_stats(prior_params, x0, margins=True)
prior_sign, prior_logabs = np.linalg.slogdet(prior_blocks)
np.testing.assert_allclose(prior_closed["logdet"], prior_logabs, atol=1e-10, rtol=0)
np.testing.assert_array_equal(prior_closed["sign"], prior_sign)
np.testing.assert_allclose(prior_blocks[0], np.eye(3), atol=1e-12)  # J_1 = I
assert (prior_sign < 0).any()  # the boundary is crossed at this scale
print("prior log|det J_t|:", np.round(prior_logabs, 3), "| signs:", prior_sign)

# %% [markdown]
# ## 10. Penalties on $J_t$, bounded and unbounded
#
# `objective.penalty` chooses what each block pays (`docs/math.md` section 10). The smooth
# log-barrier and the port's capped $-\log|\det J_t|$ reward determinant growth without
# bound; the margin hinge $\operatorname{relu}(\tau - \sigma_{\min}(J_t))^2$, the small-gain
# penalty $\phi(\|M_t\|_2)$ and $(\log|\det J_t|)^2$ are bounded below. Check each on the
# layer of section 1 against its value from the dense blocks of section 3.

# %%
_, with_svs = attention.causal_self_attention(params, u, scope="layer", with_margins=True,
                                              with_gains=True)
svs = {key: value for key, value in with_svs._asdict().items() if value is not None}
dense_sign, dense_logabs = np.linalg.slogdet(blocks)
dense_margin = np.linalg.svd(blocks, compute_uv=False)[:, -1]
dense_gain = np.linalg.svd(np.eye(D) - blocks, compute_uv=False)[:, 0]
expected = {
    "abs_log_capped": np.minimum(-dense_logabs, 30.0),
    "logdet_squared": dense_logabs**2,
    "margin_hinge": np.maximum(0.5 - dense_margin, 0) ** 2,
    "small_gain": np.where(dense_gain < 0.9, -np.log1p(-np.minimum(dense_gain, 0.9)),
                           -np.log(0.1) + (dense_gain - 0.9) / 0.1
                           + (dense_gain - 0.9) ** 2 / (2 * 0.01)),
}
for name, values in expected.items():
    np.testing.assert_allclose(penalties.penalty(name, svs), values, rtol=1e-9, atol=1e-12)
print({name: np.round(np.asarray(penalties.penalty(name, svs)), 3) for name in expected})
