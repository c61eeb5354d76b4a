"""Radiomic feature selection (paper §3.3.2, "Feature Selection and Classification").

1. Non-finite values (degenerate regions) are replaced by the training mean of the feature — the same
   value the engine uses at inference (standardised 0).
2. Near-zero variance: a feature is dropped when it is constant, or when (as caret's ``nearZeroVar``) its
   most frequent value is more than 19 times as frequent as the second (95/5) *and* fewer than 10 % of
   its values are distinct.
3. Standardise with the training set's mean and standard deviation (the caller's training fold).
4. Redundancy: a pair of features is strongly correlated when the absolute Pearson correlation *and* the
   distance correlation (Székely et al. 2007) both exceed 0.95. Features are visited from the most to the
   least discriminative (univariate AUC, as max(AUC, 1 − AUC); ties by catalogue order) and a feature is
   kept unless it is strongly correlated with one already kept — so of each redundant pair the one with
   the higher univariate AUC stays. Distance correlation is computed only for pairs whose Pearson
   correlation already passes (the criterion needs both), on at most ``DCOR_MAX_SAMPLES`` samples (a
   seeded subset), since it costs O(n²) per pair. (``scipy.spatial.distance.correlation`` is 1 − Pearson,
   not distance correlation, and no distance-correlation package is a dependency, so it is a few lines
   of numpy here.)
5. Six rankings of the remaining features, top ``TOP_K`` = 30 of each: recursive feature elimination
   (L2 logistic regression; one feature per round over the last 60, 5 % per round before), Lasso (the
   order in which features enter the Lasso path of the 0/1 labels, computed exactly by least-angle
   regression), random-forest impurity importance, XGBoost gain importance, gradient-boosting
   (scikit-learn) impurity importance, and ReliefF (k = 10 nearest hits and misses).
6. Final set = the features in all six top-30 lists (the paper finds 20). When that intersection is
   smaller than ``MIN_FEATURES`` = 12 the vote threshold is lowered — features in ≥ 5 of the 6 lists,
   then ≥ 4, … — until at least 12 features qualify; when more than ``MAX_FEATURES`` = 20 qualify, the 20
   best are kept. "Best" orders by the number of lists a feature is in, then by its mean rank over the six
   rankings, then by catalogue order. So the result has 20 features when ≥ 20 pass all six, otherwise
   between 12 and 20 (all of them, if fewer than 12 survive steps 1–4).

Everything is deterministic: fixed ``random_state`` everywhere, ``n_jobs`` = 1 for the tree ensembles.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

TOP_K = 30
MIN_FEATURES = 12
MAX_FEATURES = 20
CORRELATION_THRESHOLD = 0.95
DCOR_MAX_SAMPLES = 1000
RELIEF_NEIGHBOURS = 10
RELIEF_MAX_SAMPLES = 2000
METHODS = ("rfe", "lasso", "random_forest", "xgboost", "gradient_boosting", "relieff")


@dataclass
class SelectionResult:
    selected: list[str]
    mean: np.ndarray  # training mean of the selected features (after imputation)
    std: np.ndarray  # training standard deviation of the selected features
    votes: dict[str, int]
    mean_rank: dict[str, float]
    vote_threshold: int
    dropped: dict[str, list[str]] = field(default_factory=dict)  # step → names
    rankings: dict[str, list[str]] = field(default_factory=dict)  # method → names, best first
    auc: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict:
        return {
            "selected": self.selected,
            "vote_threshold": self.vote_threshold,
            "votes": {n: self.votes[n] for n in self.selected},
            "mean_rank": {n: round(self.mean_rank[n], 3) for n in self.selected},
            "dropped_counts": {k: len(v) for k, v in self.dropped.items()},
            "top": {m: names[:TOP_K] for m, names in self.rankings.items()},
        }


# ------------------------------------------------------------------------------------------ filters


def impute_nonfinite(X: np.ndarray, mean: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Replace non-finite values by the column mean of the finite ones (or the given means)."""
    X = np.array(X, dtype=np.float64, copy=True)
    finite = np.isfinite(X)
    if mean is None:
        sums = np.where(finite, X, 0.0).sum(axis=0)
        counts = finite.sum(axis=0)
        mean = np.divide(sums, counts, out=np.zeros(X.shape[1]), where=counts > 0)
    rows, cols = np.nonzero(~finite)
    X[rows, cols] = mean[cols]
    return X, mean


def near_zero_variance(X: np.ndarray, freq_cut: float = 95 / 5, unique_cut: float = 0.10) -> np.ndarray:
    """Boolean mask of near-zero-variance columns (constant, or caret's frequency-ratio rule)."""
    out = np.zeros(X.shape[1], bool)
    n = X.shape[0]
    for j in range(X.shape[1]):
        values, counts = np.unique(X[:, j], return_counts=True)
        if len(values) <= 1 or not np.std(X[:, j]) > 1e-12 * (1 + abs(np.mean(X[:, j]))):
            out[j] = True
            continue
        top = np.sort(counts)[::-1]
        out[j] = (top[0] / top[1] > freq_cut) and (len(values) / n < unique_cut)
    return out


def standardise(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Z, mean, std); a zero std becomes 1."""
    mean = X.mean(axis=0)
    std = X.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return (X - mean) / std, mean, std


def univariate_auc(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """max(AUC, 1 − AUC) of each column as a score for y (Mann–Whitney via ranks)."""
    from scipy.stats import rankdata

    pos = y == 1
    n1, n0 = int(pos.sum()), int((~pos).sum())
    if n1 == 0 or n0 == 0:
        return np.full(X.shape[1], 0.5)
    ranks = rankdata(X, axis=0)
    auc = (ranks[pos].sum(axis=0) - n1 * (n1 + 1) / 2) / (n1 * n0)
    return np.maximum(auc, 1 - auc)


def distance_correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Sample distance correlation of two 1D samples (Székely, Rizzo & Bakirov 2007)."""

    def centred(v):
        d = np.abs(v[:, None] - v[None, :])
        return d - d.mean(axis=0)[None, :] - d.mean(axis=1)[:, None] + d.mean()

    a, b = centred(np.asarray(x, np.float64)), centred(np.asarray(y, np.float64))
    dcov2 = (a * b).mean()
    dvar = np.sqrt((a * a).mean() * (b * b).mean())
    return float(np.sqrt(max(dcov2, 0.0) / dvar)) if dvar > 0 else 0.0


def correlation_filter(
    Z: np.ndarray, score: np.ndarray, rng: np.random.Generator, threshold: float = CORRELATION_THRESHOLD
) -> np.ndarray:
    """Indices of the columns kept by the greedy Pearson + distance-correlation filter (best score first)."""
    pearson = np.abs(np.corrcoef(Z, rowvar=False)) if Z.shape[1] > 1 else np.ones((1, 1))
    pearson = np.nan_to_num(pearson, nan=0.0)
    rows = rng.choice(len(Z), DCOR_MAX_SAMPLES, replace=False) if len(Z) > DCOR_MAX_SAMPLES else np.arange(len(Z))
    rows = np.sort(rows)
    order = sorted(range(Z.shape[1]), key=lambda j: (-score[j], j))
    kept: list[int] = []
    for j in order:
        redundant = False
        for k in kept:
            if pearson[j, k] > threshold and distance_correlation(Z[rows, j], Z[rows, k]) > threshold:
                redundant = True
                break
        if not redundant:
            kept.append(j)
    return np.array(sorted(kept), dtype=int)


# ------------------------------------------------------------------------------------------ rankings


def rank_rfe(Z, y, seed):
    """Recursive feature elimination with L2 logistic regression (liblinear).

    Down to 2 × ``TOP_K`` features it removes 5 % of the features per round; from there one per round,
    so the top of the ranking is exact and large candidate sets stay affordable.
    """
    from sklearn.feature_selection import RFE
    from sklearn.linear_model import LogisticRegression

    def estimator():
        return LogisticRegression(C=1.0, solver="liblinear", max_iter=5000, random_state=seed)

    p = Z.shape[1]
    survivors = np.arange(p)
    coarse_rank = np.zeros(p)
    if p > 2 * TOP_K:
        coarse = RFE(estimator(), n_features_to_select=2 * TOP_K, step=0.05).fit(Z, y)
        coarse_rank = coarse.ranking_.astype(float)
        survivors = np.flatnonzero(coarse.support_)
    fine = RFE(estimator(), n_features_to_select=1, step=1).fit(Z[:, survivors], y)
    rank = coarse_rank + len(survivors)  # eliminated early: after all survivors, in elimination order
    rank[survivors] = fine.ranking_
    return np.lexsort((np.arange(p), rank))


def rank_lasso(Z, y, seed):
    """Order in which features enter the Lasso path (LARS-Lasso on the 0/1 labels; ties: |coefficient| at the end)."""
    from sklearn.linear_model import lars_path

    target = np.asarray(y, np.float64) - np.mean(y)
    _, _, coefs = lars_path(Z, target, method="lasso")  # coefs: (p, n_alphas), from the largest alpha down
    nonzero = np.abs(coefs) > 1e-12
    entered = np.where(nonzero.any(axis=1), nonzero.argmax(axis=1), coefs.shape[1])
    return np.lexsort((np.arange(Z.shape[1]), -np.abs(coefs[:, -1]), entered))


def rank_random_forest(Z, y, seed):
    from sklearn.ensemble import RandomForestClassifier

    model = RandomForestClassifier(n_estimators=300, class_weight="balanced", random_state=seed, n_jobs=1).fit(Z, y)
    return _order(model.feature_importances_)


def rank_xgboost(Z, y, seed):
    from xgboost import XGBClassifier

    model = XGBClassifier(
        n_estimators=200, max_depth=4, learning_rate=0.1, subsample=1.0, colsample_bytree=1.0,
        importance_type="gain", random_state=seed, n_jobs=1, tree_method="exact",
    ).fit(Z, y)
    return _order(model.feature_importances_)


def rank_gradient_boosting(Z, y, seed):
    from sklearn.ensemble import GradientBoostingClassifier

    model = GradientBoostingClassifier(n_estimators=150, max_depth=3, random_state=seed).fit(Z, y)
    return _order(model.feature_importances_)


def relieff_weights(X: np.ndarray, y: np.ndarray, *, k: int = RELIEF_NEIGHBOURS, max_samples: int = RELIEF_MAX_SAMPLES,
                    rng: np.random.Generator | None = None) -> np.ndarray:
    """ReliefF feature weights (Kononenko 1994) for two classes.

    Written here because the maintained implementation (skrebate) is not among this package's
    dependencies; for two classes ReliefF is short. Features are scaled to [0, 1]; distances are
    Manhattan; for each of up to ``max_samples`` reference samples the k nearest hits (same class) and
    misses (other class) are found, and W_f += mean |x_f − miss_f| − mean |x_f − hit_f|, averaged.
    """
    X = np.asarray(X, np.float64)
    span = X.max(axis=0) - X.min(axis=0)
    S = (X - X.min(axis=0)) / np.where(span > 0, span, 1.0)
    n = len(S)
    rng = rng or np.random.default_rng(0)
    refs = np.sort(rng.choice(n, max_samples, replace=False)) if n > max_samples else np.arange(n)
    from scipy.spatial.distance import cdist

    weights = np.zeros(S.shape[1])
    for start in range(0, len(refs), 256):
        batch = refs[start : start + 256]
        d = cdist(S[batch], S, metric="cityblock")
        d[np.arange(len(batch)), batch] = np.inf  # not its own neighbour
        for row, i in enumerate(batch):
            for same, sign in ((True, -1.0), (False, 1.0)):
                candidates = np.flatnonzero((y == y[i]) == same)
                candidates = candidates[np.isfinite(d[row, candidates])]
                if len(candidates) == 0:
                    continue
                kk = min(k, len(candidates))
                near = candidates[np.argsort(d[row, candidates], kind="stable")[:kk]]
                weights += sign * np.abs(S[near] - S[i]).mean(axis=0)
    return weights / len(refs)


def rank_relieff(Z, y, seed):
    return _order(relieff_weights(Z, y, rng=np.random.default_rng(seed)))


def _order(importance: np.ndarray) -> np.ndarray:
    """Indices by decreasing importance, ties by index."""
    importance = np.nan_to_num(np.asarray(importance, np.float64), nan=-np.inf)
    return np.lexsort((np.arange(len(importance)), -importance))


RANKERS = {
    "rfe": rank_rfe,
    "lasso": rank_lasso,
    "random_forest": rank_random_forest,
    "xgboost": rank_xgboost,
    "gradient_boosting": rank_gradient_boosting,
    "relieff": rank_relieff,
}


# ------------------------------------------------------------------------------------------ selection


def select_features(
    X: np.ndarray,
    y: np.ndarray,
    names: list[str],
    *,
    seed: int = 0,
    top_k: int = TOP_K,
    min_features: int = MIN_FEATURES,
    max_features: int = MAX_FEATURES,
) -> SelectionResult:
    """The paper's selection on a training set ``X`` (n × p, raw features) with labels ``y`` (0/1)."""
    y = np.asarray(y).astype(int)
    if len(np.unique(y)) != 2:
        raise ValueError("feature selection needs samples of both classes")
    names = list(names)
    X, _ = impute_nonfinite(X)
    dropped: dict[str, list[str]] = {}
    nzv = near_zero_variance(X)
    dropped["near_zero_variance"] = [n for n, d in zip(names, nzv) if d]
    keep = np.flatnonzero(~nzv)
    Z, _, _ = standardise(X[:, keep])
    auc_all = univariate_auc(Z, y)
    kept = correlation_filter(Z, auc_all, np.random.default_rng(seed))
    dropped["correlated"] = [names[keep[j]] for j in range(len(keep)) if j not in set(kept.tolist())]
    columns = keep[kept]
    Z = Z[:, kept]
    candidates = [names[j] for j in columns]
    auc = {names[j]: float(a) for j, a in zip(columns, auc_all[kept])}

    rankings: dict[str, list[str]] = {}
    ranks = np.zeros((len(RANKERS), len(candidates)))
    for m, (method, ranker) in enumerate(RANKERS.items()):
        order = np.asarray(ranker(Z, y, seed))
        rankings[method] = [candidates[j] for j in order]
        ranks[m, order] = np.arange(1, len(order) + 1)
    in_top = ranks <= top_k
    votes = in_top.sum(axis=0)
    mean_rank = ranks.mean(axis=0)
    best_first = sorted(range(len(candidates)), key=lambda j: (-votes[j], mean_rank[j], columns[j]))
    threshold = len(RANKERS)
    while threshold > 1 and np.count_nonzero(votes >= threshold) < min(min_features, len(candidates)):
        threshold -= 1
    chosen = [j for j in best_first if votes[j] >= threshold][:max_features]
    if len(chosen) < min(min_features, len(candidates)):  # fewer features than top_k lists can hold
        chosen = best_first[: min(min_features, len(candidates))]
    selected = [candidates[j] for j in sorted(chosen, key=lambda j: columns[j])]  # in catalogue order
    X_sel = X[:, [names.index(n) for n in selected]]
    mean = X_sel.mean(axis=0)
    std = X_sel.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return SelectionResult(
        selected=selected,
        mean=mean,
        std=std,
        votes={c: int(v) for c, v in zip(candidates, votes)},
        mean_rank={c: float(r) for c, r in zip(candidates, mean_rank)},
        vote_threshold=int(threshold),
        dropped=dropped,
        rankings=rankings,
        auc=auc,
    )
