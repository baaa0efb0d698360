"""Polar Express (Amsel, Persson, Musco, Gower 2025, "The Polar Express: Optimal Matrix Sign Methods and Their
Application to the Muon Algorithm", arXiv:2505.16932), as the authors' code computes it
(github.com/NoahAmsel/PolarExpress, ``polar_express.py``; the same function is in modded-nanogpt), with the dtype
as a parameter (the authors cast to bf16) so the oracle runs in fp32 / fp64 on CPUs.

Transcribed from the published algorithm: the degree-5 coefficient table for l = 1e-3, a 1.01 safety factor on
every polynomial but the last (a / 1.01, b / 1.01^3, c / 1.01^5), the input scaled by 1 / (1.01 ||G||_F + 1e-7),
the last polynomial repeated beyond the table, and the wide orientation.
"""

from __future__ import annotations

from itertools import repeat

import torch

COEFFS_LIST = [
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),  # subsequent coefficients equal this numerically
]
# safety factor for numerical stability (but exclude the last polynomial)
COEFFS_LIST = [(a / 1.01, b / 1.01**3, c / 1.01**5) for (a, b, c) in COEFFS_LIST[:-1]] + [COEFFS_LIST[-1]]


def polar_express(G: torch.Tensor, steps: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    assert G.ndim >= 2
    X = G.to(dtype)
    if G.size(-2) > G.size(-1):
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-7)
    hs = COEFFS_LIST[:steps] + list(repeat(COEFFS_LIST[-1], steps - len(COEFFS_LIST)))
    for a, b, c in hs:
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X  # X <- aX + bX^3 + cX^5
    if G.size(-2) > G.size(-1):
        X = X.mT
    return X
