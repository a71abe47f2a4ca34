"""Synthetic two-task regression data of the MMoE paper (Ma et al., KDD 2018, section 4.1).

Why: it isolates one question, how a multi-task bottom copes with task relatedness, with the
relatedness set exactly by one number p (cosine of the two task weight vectors), and no
feature-engineering noise. The label correlation falls as p falls, which is what Figure 4 studies.

    u1 ⟂ u2 unit vectors in R^d,  w1 = c·u1,  w2 = c·(p·u1 + sqrt(1-p²)·u2)
    x ~ N(0, I_d),   y_i = w_iᵀx + Σ_{j=1..m} sin(α_j w_iᵀx + β_j) + ε_i,   ε_i ~ N(0, 0.01)

α_j, β_j ~ N(0, 1) are shared by both tasks; 0.01 is the noise variance (std 0.1); c = 1.
"""
from __future__ import annotations

import numpy as np

MMOE_C = 1.0
NOISE_STD = 0.1


def mmoe_synthetic(n: int, correlation: float, dim: int = 100, m: int = 10,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Return X float32 [n, dim] and Y float32 [n, 2] for task-weight cosine `correlation`.

    Task parameters (u1, u2, α, β), inputs and noise come from separate child seeds, so for one
    seed every `correlation` shares the same x and noise (only w2 changes), and a larger n
    extends a smaller one (the first rows are equal).
    """
    if not -1.0 <= correlation <= 1.0:
        raise ValueError(f"correlation must be in [-1, 1], got {correlation!r}")
    if dim < 2 or n < 0 or m < 0:
        raise ValueError(f"need dim >= 2, n >= 0, m >= 0 (got dim={dim}, n={n}, m={m})")
    params, inputs, noise = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    q, _ = np.linalg.qr(params.standard_normal((dim, 2)))      # orthonormal u1, u2
    u1, u2 = q[:, 0], q[:, 1]
    alpha, beta = params.standard_normal(m), params.standard_normal(m)
    w = MMOE_C * np.stack([u1, correlation * u1 + np.sqrt(1.0 - correlation**2) * u2], axis=1)
    x = inputs.standard_normal((n, dim))
    lin = x @ w                                                   # [n, 2]
    y = lin + np.sin(lin[:, :, None] * alpha + beta).sum(axis=2) + noise.normal(0.0, NOISE_STD, (n, 2))
    return x.astype(np.float32), y.astype(np.float32)
