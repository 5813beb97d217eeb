"""W_plug: linear maps between an SLM's and an LLM's spaces, fitted without gradients.

Jin, Zhang & Zong, "Parameter-efficient Tuning for Large Language Model without Calculating Its
Gradients", EMNLP 2023: a parameter-efficient module learned on an SLM is plugged into an LLM
through linear projections W_plug (width) and duplicated over layers (depth).

Each space gets a ridge least-squares map fitted from accumulated second moments, so memory does
not grow with the calibration data. With rows x_s (SLM) and x_l (LLM) of paired activations:

    to_llm  P = argmin_P ||X_s Pᵀ − X_l||² + λ||P||²  =  (X_lᵀX_s)(X_sᵀX_s + λI)⁻¹      [n_l, n_s]
    to_slm  Q = argmin_Q ||X_l Qᵀ − X_s||² + λ||Q||²  =  (X_sᵀX_l)(X_lᵀX_l + λI)⁻¹      [n_s, n_l]

λ = ridge · tr(G)/n (relative to the mean eigenvalue of the regressor's Gram G) is a light, scale-free
floor, raised per map to the empirical-Bayes value σ²/τ² when the data are noisy (fit_map). Fit quality is the relative residual ||X Mᵀ − Y|| / ||Y||, computed from the same moments.

LoRA ΔW = s·B·A ([out, r]·[r, in]) is ported without any decomposition: the LLM's input x_l is
carried into the SLM's input space by Q_in, through the SLM's delta, and out by P_out:

    ΔW_llm = P_out · ΔW_slm · Q_in   ⇒   A_llm = A · Q_in,  B_llm = P_out · B      (rank and s kept)
"""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def threads_for(n: int):
    """All cores for n×n factorisations at real widths; one below 1024, where LAPACK's threading
    costs more than it saves (up to ~100× slower on small matrices when the CPUs are contended)."""
    import torch

    before = torch.get_num_threads()
    want = before if n >= 1024 else 1
    torch.set_num_threads(want)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Moments:
    """Running float64 Gram and cross-Gram matrices of paired activations (rows = tokens)."""

    def __init__(self, n_slm: int, n_llm: int, need_slm_gram: bool = True, need_llm_gram: bool = True):
        import torch

        f = dict(dtype=torch.float64)
        self.ss = torch.zeros(n_slm, n_slm, **f) if need_slm_gram else None
        self.ll = torch.zeros(n_llm, n_llm, **f) if need_llm_gram else None
        self.ls = torch.zeros(n_llm, n_slm, **f)  # X_lᵀ X_s
        self.tr_ss = 0.0  # ||X_s||², enough for the residual of a map *to* the SLM
        self.tr_ll = 0.0
        self.sq_l = torch.zeros(n_llm, **f)  # per LLM coordinate Σ x², for per-row fits to the LLM
        self.count = 0

    def add(self, x_slm, x_llm, chunk: int | None = None) -> None:
        """Accumulate paired rows; `chunk` rows at a time (None: all at once), so the float64 copies
        are chunk × (n_s + n_l), not the whole batch's. The sums are the same up to rounding."""
        if x_slm.shape[0] != x_llm.shape[0]:
            raise ValueError(f"unpaired activations: {x_slm.shape[0]} vs {x_llm.shape[0]} rows")
        step = chunk or max(x_slm.shape[0], 1)
        for r in range(0, x_slm.shape[0], step):
            self._add(x_slm[r:r + step], x_llm[r:r + step])

    def _add(self, x_slm, x_llm) -> None:
        import torch

        xs, xl = x_slm.to(torch.float64), x_llm.to(torch.float64)
        if self.ss is not None:
            self.ss.addmm_(xs.T, xs)
        if self.ll is not None:
            self.ll.addmm_(xl.T, xl)
        self.ls.addmm_(xl.T, xs)
        self.tr_ss += float(torch.vdot(xs.reshape(-1), xs.reshape(-1)))
        self.tr_ll += float(torch.vdot(xl.reshape(-1), xl.reshape(-1)))
        self.sq_l += xl.pow(2).sum(0)
        self.count += xs.shape[0]


def ridge_solve(gram, cross, ridge: float, prior=None, lam: float | None = None):
    """M = (cross + λ·M₀) · (gram + λI)⁻¹ with λ = ridge · tr(gram)/n (or `lam`); gram [n, n], cross [m, n].

    The ridge pulls M toward `prior` M₀ (zero by default) in the directions the data barely excites.
    """
    import torch

    n = gram.shape[0]
    lam = ridge * float(torch.trace(gram)) / max(n, 1) if lam is None else lam
    if lam <= 0:  # an all-zero regressor (e.g. a silent layer): the only sensible map is zero
        return torch.zeros(cross.shape, dtype=torch.float64)
    if prior is not None:
        cross = cross + lam * prior
    reg = gram + lam * torch.eye(n, dtype=gram.dtype)
    L, info = torch.linalg.cholesky_ex(reg)
    if int(info) != 0:  # numerically indefinite despite the ridge: fall back to the pseudo-inverse
        return cross @ torch.linalg.pinv(reg, hermitian=True)
    return torch.cholesky_solve(cross.T, L).T  # reg symmetric: (reg⁻¹ crossᵀ)ᵀ = cross reg⁻¹


def fit_map(gram, cross, target_sq: float, count: int, ridge: float, prior=None) -> tuple:
    """Ridge map with an empirical-Bayes λ: (M, λ used).

    First pass at the floor λ₀ = ridge·tr(G)/n. The residual gives the noise variance
    σ² = RSS/(m·(N − n)), the map the spread of its entries around the prior τ² = ‖M − M₀‖²/(m·n);
    the Bayes-optimal ridge is σ²/τ². Exact relations (RSS ≈ 0) keep λ at the floor, so an exact
    map stays exact; noisy ones get shrunk instead of fitting noise in barely-excited directions,
    which is what a LoRA delta pointing there would otherwise amplify.
    """
    import torch

    n = gram.shape[0]
    lam0 = ridge * float(torch.trace(gram)) / max(n, 1)
    M = ridge_solve(gram, cross, ridge, prior, lam0)
    if lam0 <= 0 or target_sq <= 0:
        return M, lam0
    m, lam = cross.shape[0], lam0
    for _ in range(8):  # fixed point of λ = σ²(λ)/τ²(λ): an overfitted first M underestimates λ
        rss = max(relative_residual(M, gram, cross, target_sq), 0.0) ** 2 * target_sq
        sigma2 = rss / (m * max(count - n, 1))
        tau2 = float(((M - prior) if prior is not None else M).pow(2).sum()) / (m * n)
        if sigma2 <= 0 or tau2 <= 0 or sigma2 / tau2 <= lam0:
            break
        new = sigma2 / tau2
        converged = abs(new - lam) <= 0.05 * lam
        lam = new
        M = ridge_solve(gram, cross, ridge, prior, lam)
        if converged:
            break
    return M, lam


def fit_map_rows(gram, cross, target_sq, count: int, ridge: float, prior=None) -> tuple:
    """Ridge map with one empirical-Bayes λ per output row: (M, λ per row [m], eigenvalues of gram).

    Each row of M is its own regression on the same regressors, so each gets its own σ²/τ² (the
    fixed point of fit_map, row by row): an LLM coordinate the SLM predicts exactly (a unit the LLM
    shares with it) keeps λ at the floor even when other coordinates (extra heads or neurons that
    read the residual in their own way) are unpredictable, whose rows alone are shrunk. With one λ
    for the whole map, those rows' noise would shrink the exact ones too (1–4 % of the adapter's
    effect lost on ×3 expansions whose extra units read the residual). One eigendecomposition
    G = V·diag(e)·Vᵀ makes every row's solve O(n): row r is ((c_r + λ_r·p_r)V / (e + λ_r)) Vᵀ.
    target_sq: [m] Σ y_r² per row. A row whose target is identically zero gets 0 (nothing to act on).
    """
    import torch

    n, m = gram.shape[0], cross.shape[0]
    lam0 = ridge * float(torch.trace(gram)) / max(n, 1)
    if lam0 <= 0:
        return torch.zeros(cross.shape, dtype=torch.float64), torch.zeros(m, dtype=torch.float64), None
    e, V = torch.linalg.eigh(gram)
    e = e.clamp_min(0).unsqueeze(0)
    z = cross @ V
    p = None if prior is None else prior @ V
    lam = torch.full((m, 1), lam0, dtype=torch.float64)
    dof = max(count - n, 1)

    def solve(lam):
        return (z if p is None else z + lam * p) / (e + lam)

    u = solve(lam)
    for _ in range(8):
        rss = ((u * u * e).sum(1) - 2 * (u * z).sum(1) + target_sq).clamp_min(0)
        tau2 = (u if p is None else u - p).pow(2).sum(1) / n
        ratio = torch.where(tau2 > 0, rss / dof / tau2.clamp_min(1e-300), torch.zeros_like(tau2))
        new = ratio.clamp_min(lam0).unsqueeze(1)
        converged = bool(((new - lam).abs() <= 0.05 * lam).all())
        lam = new
        u = solve(lam)
        if converged:
            break
    u[target_sq <= 0] = 0.0
    return u @ V.T, lam.squeeze(1), e.squeeze(0)


def relative_residual(M, gram, cross, target_sq: float) -> float:
    """||X Mᵀ − Y|| / ||Y|| from moments: ||XMᵀ−Y||² = tr(M G Mᵀ) − 2 tr(M Cᵀ) + ||Y||², C = YᵀX."""
    import torch

    if target_sq <= 0:
        return 0.0
    sq = float(torch.sum((M @ gram) * M) - 2 * torch.sum(M * cross)) + target_sq
    return max(sq, 0.0) ** 0.5 / target_sq ** 0.5


def resolved_rank(gram, lam: float) -> int:
    """Directions the fit resolves: eigenvalues of the regressor's Gram above its ridge λ (shrunk < 50 %).

    Counted without an eigendecomposition (Sylvester's law of inertia): the eigenvalues of G above λ
    are the positive ones of G − λI, which its LDLᵀ factorisation's D shows — a 1×1 pivot by its
    sign, a 2×2 pivot (always of one positive and one negative eigenvalue when its determinant is
    negative) by its determinant and trace. About 5× faster than eigvalsh at widths in the thousands,
    and LAPACK's blocked factorisation uses every core.
    """
    import torch

    if lam <= 0:
        return 0
    A = gram - lam * torch.eye(gram.shape[0], dtype=gram.dtype)
    LD, piv, info = torch.linalg.ldl_factor_ex(A)
    del A
    d = LD.diagonal().tolist()
    sub = LD.diagonal(-1).tolist()
    piv = piv.tolist()
    count, k, n = 0, 0, len(d)
    while k < n:
        if piv[k] > 0 or k + 1 == n:  # 1×1 pivot
            count += d[k] > 0
            k += 1
        else:  # 2×2 pivot on rows k, k+1 (LAPACK marks both with the same negative index)
            det, tr = d[k] * d[k + 1] - sub[k] ** 2, d[k] + d[k + 1]
            count += 1 if det < 0 else (2 if tr > 0 else 0) if det > 0 else (d[k] > 0) + (d[k + 1] > 0)
            k += 2
    return int(count)


def fit_to_llm(m: Moments, ridge: float, prior=None) -> tuple:
    """P [n_l, n_s] carrying SLM vectors into the LLM's space, its relative residual and resolved rank.

    With a prior P₀ the ridge pulls toward g·P₀ (g fitted, see below) instead of toward 0.
    A target that is exactly zero (an LLM module that writes nothing, e.g. a pass-through layer's
    o_proj) gets P = 0 whatever the prior: the LLM has nothing there for the adapter to act on.
    """
    import torch

    if m.tr_ll == 0.0:
        prior = None
    if prior is not None:
        # scale the prior to the data first: g = argmin ||g·X_s P₀ᵀ − X_l||², so a module that
        # writes little (a near-silent layer) gets a correspondingly small prior
        denom = float(torch.sum((prior @ m.ss) * prior))
        prior = prior * (float(torch.sum(prior * m.ls)) / denom if denom > 0 else 0.0)
    with threads_for(m.ss.shape[0]):
        P, lam, ev = fit_map_rows(m.ss, m.ls, m.sq_l, m.count, ridge, prior)
        rank = 0 if ev is None else int((ev > lam.median()).sum())  # at the typical row's ridge
        return P, relative_residual(P, m.ss, m.ls, m.tr_ll), rank


def fit_to_slm(m: Moments, ridge: float) -> tuple:
    """Q [n_s, n_l] carrying LLM vectors into the SLM's space, its relative residual and resolved rank."""
    with threads_for(m.ll.shape[0]):
        Q, lam = fit_map(m.ll, m.ls.T, m.tr_ss, m.count, ridge)
        return Q, relative_residual(Q, m.ll, m.ls.T, m.tr_ss), resolved_rank(m.ll, lam)


def port_lora(A, B, to_slm_in, to_llm_out, bias=None, balance: bool = False):
    """A_llm = A · Q_in, B_llm = P_out · B (and a lora_B bias → P_out · bias); float32 results.

    balance: refactor the ported product P_out·B·A·Q_in into balanced factors (balance_factors): the
    same delta, but Q_in shrinks A (it reads the LLM's wider space into the SLM's) and P_out grows B, so
    the raw factors come out lopsided (on the evidence pair ‖B‖ ≈ 9 against ‖A‖ ≈ 0.35 for q_proj).
    Off by default: measured through tune-bridge and refine it helped on one seed and hurt on another
    (docs/method-experiments.md), so the port keeps the paper's plain product of maps.
    """
    import torch

    A2 = A.to(torch.float64) @ to_slm_in
    B2 = to_llm_out @ B.to(torch.float64)
    if balance:
        A2, B2 = balance_factors(A2, B2)
    b2 = None if bias is None else (to_llm_out @ bias.to(torch.float64)).float()
    return A2.float(), B2.float(), b2


def balance_factors(A, B):
    """(A', B') with B'·A' = B·A, ‖A'‖ = ‖B'‖ and the rank kept: B·A = Q_b R_b R_aᵀ Q_aᵀ (two thin
    QRs), R_b R_aᵀ = U S Vᵀ (r × r), B' = Q_b U √S, A' = √S Vᵀ Q_aᵀ. Float64 in and out. A rank
    above a side's width (r > in or out) keeps the factors and only equalises their norms; a zero
    product is returned as it came."""
    import torch

    r = A.shape[0]
    if r > min(A.shape[1], B.shape[0]):
        if not (A.norm() > 0 and B.norm() > 0):
            return A, B
        c = (B.norm() / A.norm()).sqrt()
        return A * c, B / c
    qb, rb = torch.linalg.qr(B)
    qa, ra = torch.linalg.qr(A.T)
    U, S, Vh = torch.linalg.svd(rb @ ra.T)
    if not S[0] > 0:  # a zero delta (an untrained LoRA: B = 0) keeps its factors, so tuning can start from A
        return A, B
    root = S.sqrt()
    return (root[:, None] * Vh) @ qa.T, (qb @ U) * root


def depth_blocks(n_slm: int, n_llm: int) -> list[list[int]]:
    """SLM layer i → LLM layers [⌊i·L/l⌋, ⌊(i+1)·L/l⌋): consecutive blocks, sizes differ by ≤ 1."""
    return [list(range(i * n_llm // n_slm, (i + 1) * n_llm // n_slm)) for i in range(n_slm)]
