"""``python -m minidiff.selfcheck``: a small demo of the comparison engines on real
data that ships with scikit-learn (the 1,797 8x8 digit images), no downloads.

Representation similarity: linear CKA between the raw pixels and a few
transformations of them (PCA at several widths, a random projection, the class
labels), the unbiased estimator next to the biased one, and the streaming
accumulator checked against the in-memory result. Prediction agreement (when
``minidiff.agreement`` is present): four scikit-learn classifiers trained on the
same split, their pairwise churn, flips and error-set Jaccard.
"""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import torch


def _representations(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(0)
    reps = {f"PCA-{k}": PCA(n_components=k, random_state=0).fit_transform(x) for k in (2, 8, 32)}
    reps["random projection 64->32"] = x @ rng.standard_normal((64, 32))
    reps["one-hot labels"] = np.eye(10)[y]
    reps["shuffled pixels rows"] = x[rng.permutation(len(x))]
    return reps


def check_similarity(x: np.ndarray, y: np.ndarray) -> bool:
    from minidiff import CKAAccumulator, cka, cka_matrix

    print("Representation similarity: linear CKA(pixels, representation), digits n=%d" % len(x))
    print(f"  {'representation':28s} {'biased':>8s} {'unbiased':>9s}")
    reps = _representations(x, y)
    for name, r in reps.items():
        print(f"  {name:28s} {cka(x, r):8.4f} {cka(x, r, estimator='unbiased'):9.4f}")
    print("  (unbiased ~0 for the row-shuffled pixels: no shared structure; the biased estimator is inflated)")

    feats = [torch.from_numpy(r).float() for r in (x, reps["PCA-8"], reps["one-hot labels"])]
    full = cka_matrix(feats)
    acc = CKAAccumulator([f.shape[1] for f in feats])
    for i in range(0, len(x), 256):
        acc.update([f[i:i + 256] for f in feats])
    diff = float((acc.compute() - full).abs().max())
    ok = diff < 1e-6
    print(f"  streaming accumulator (batches of 256) vs in-memory cka_matrix: max |diff| = {diff:.1e} "
          f"[{'ok' if ok else 'FAIL'}]")
    return ok


def check_agreement(x: np.ndarray, y: np.ndarray) -> bool:
    if importlib.util.find_spec("minidiff.agreement") is None:
        print("Prediction agreement: minidiff.agreement not available yet, skipped")
        return True
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.naive_bayes import GaussianNB
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.tree import DecisionTreeClassifier

    from minidiff import disagreement_matrix, error_jaccard, flip_matrix

    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.4, random_state=0, stratify=y)
    models = {"logreg": LogisticRegression(max_iter=2000), "3-NN": KNeighborsClassifier(3),
              "tree": DecisionTreeClassifier(random_state=0), "naive Bayes": GaussianNB()}
    preds = np.stack([m.fit(xtr, ytr).predict(xte) for m in models.values()]).astype(np.int64)
    names = list(models)
    churn = disagreement_matrix(preds)
    flips = flip_matrix(preds, yte)
    jac = error_jaccard(preds, yte)
    print(f"\nPrediction agreement: 4 scikit-learn classifiers on the digits test split (m={len(yte)})")
    for i, name in enumerate(names):
        print(f"  {name:12s} accuracy {float((preds[i] == yte).mean()):.3f}")
    print(f"  {'pair':26s} {'churn':>6s} {'i right/j wrong':>16s} {'i wrong/j right':>16s} {'error Jaccard':>14s}")
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            print(f"  {names[i] + ' vs ' + names[j]:26s} {float(churn[i, j]):6.3f} {float(flips[i, j, 0]):16.3f} "
                  f"{float(flips[i, j, 1]):16.3f} {float(jac[i, j]):14.3f}")
    expected = (preds[:, None, :] != preds[None, :, :]).mean(-1)
    ok = bool(np.allclose(np.asarray(churn, dtype=np.float64), expected, atol=1e-12))
    print(f"  churn matches a direct numpy count: [{'ok' if ok else 'FAIL'}]")
    return ok


def main() -> int:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.data.astype(np.float64)
    y = digits.target
    ok = check_similarity(x, y)
    ok = check_agreement(x, y) and ok
    print("\nselfcheck " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
