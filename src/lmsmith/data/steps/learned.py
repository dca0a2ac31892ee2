"""Fitted operators that learn from the data: `quality_classifier` (a self-trained noise classifier) and
`coverage` (rare clusters, tagged for oversampling). Both are fitted by the data pipeline on its first
records before the stream runs (`lmsmith.data.engine.fit_ops`) and write what they learnt as plain arrays
(`.npz`, read with `allow_pickle=False`: no pickle is ever loaded) into the run's `fitted/` folder; the
spec carries the file's path, so every worker, local or Ray, rebuilds the same operator from its spec.

Features are hashed character n-grams (scikit-learn's `HashingVectorizer`: stateless, so the file holds
only the learnt numbers).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
from pydantic import Field

from lmsmith.data.steps import Filter, OpConfig, register
from lmsmith.errors import UserError
from lmsmith.paths import InputPath


def _vectorizer(ngram_max: int, features: int):
    from sklearn.feature_extraction.text import HashingVectorizer

    return HashingVectorizer(analyzer="char", ngram_range=(1, int(ngram_max)), n_features=int(features),
                             alternate_sign=False, norm="l2", lowercase=True)


def _save(fit_dir: Path, stem: str, arrays: dict[str, np.ndarray]) -> str:
    """Write `arrays` to `fit_dir/STEM-HASH.npz` (the hash of the content, so a spec names one model) and
    return the absolute path."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    path = Path(fit_dir) / f"{stem}-{digest.hexdigest()[:12]}.npz"
    if not path.exists():
        partial = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez_compressed(partial, **arrays)
        partial.replace(path)
    return str(path.resolve())


def _load(path: str, what: str, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in keys}
    except (OSError, KeyError, ValueError) as exc:
        raise UserError(f"{what}: cannot read {path}: {exc}") from None
    return arrays


# ------------------------------------------------------------------------------------ quality_classifier


class QualityClassifierConfig(OpConfig):
    min_confidence: float = Field(0.9, gt=0.5, le=1, description="Drop a text when the classifier's P(noisy) reaches this.")
    ngram_max: int = Field(3, ge=1, le=6, description="Features: hashed character n-grams of 1 to this many characters.")
    features: int = Field(1 << 18, ge=1 << 8, le=1 << 22, description="Hashed feature slots.")
    regularization: float = Field(1.0, gt=0, description="Inverse regularization strength (C) of the logistic regression.")
    rounds: int = Field(
        3, ge=0, le=20,
        description="Self-training rounds: rule-kept texts that the model, trained without them (3-fold), finds "
        "noisy with P ≥ pseudo_label_confidence are relabelled noisy and the model retrained.",
    )
    pseudo_label_confidence: float = Field(0.9, gt=0.5, le=1, description="P(noisy) at which a pseudo-label is added.")
    seed: int = Field(0, description="Seed of the self-training folds.")
    weights: Optional[InputPath] = Field(
        None, description="The fitted model: an .npz of its coefficients written by the fit into the run's "
        "fitted/ folder (set it to reuse a model; then nothing is fitted).",
    )


@register("quality_classifier")
class QualityClassifier(Filter):
    """Drop texts a self-trained noise classifier is confident about (a fitted step, see above): a logistic
    regression on hashed character 1-3-grams, seeded with the rule labels of the fit sample (dropped or
    emptied by the rule operators: noisy; kept: clean), then self-trained by relabelling rule-kept texts it
    confidently finds noisy. Put it last to drop what the rules let through."""

    Config = QualityClassifierConfig
    fits = True

    def __init__(self, config: QualityClassifierConfig):
        super().__init__(config)
        self._model: Optional[tuple[Any, np.ndarray, float]] = None
        if config.weights is not None:
            arrays = _load(config.weights, "quality_classifier.weights", ("index", "value", "intercept", "shape"))
            ngram_max, features = (int(v) for v in arrays["shape"])
            coef = np.zeros(features, dtype=np.float64)
            coef[arrays["index"].astype(np.int64)] = arrays["value"]
            self._model = (_vectorizer(ngram_max, features), coef, float(arrays["intercept"][0]))

    def needs_fit(self) -> bool:
        return self.config.weights is None

    def fit(self, texts: list[str], rule_noisy: list[bool], fit_dir: Path) -> dict[str, Any]:
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import StratifiedKFold, cross_val_predict

        config = self.config
        labels = np.array(rule_noisy, dtype=np.int64)
        noisy = int(labels.sum())
        if noisy < 3 or len(labels) - noisy < 3:
            raise UserError(f"quality_classifier: the fit sample has {noisy} texts the rules flag and "
                            f"{len(labels) - noisy} they keep; it needs at least 3 of each (raise fit_sample)")
        vectorizer = _vectorizer(config.ngram_max, config.features)
        features = vectorizer.transform(texts)

        def model() -> LogisticRegression:
            return LogisticRegression(C=config.regularization, class_weight="balanced", max_iter=2000)

        for _ in range(config.rounds):
            folds = StratifiedKFold(3, shuffle=True, random_state=config.seed)
            held_out = cross_val_predict(model(), features, labels, cv=folds, method="predict_proba")[:, 1]
            new = (labels == 0) & (held_out >= config.pseudo_label_confidence)
            if not new.any() or len(labels) - int(labels.sum()) - int(new.sum()) < 3:
                break
            labels[new] = 1
        fitted = model().fit(features, labels)
        coef = fitted.coef_[0]
        index = np.flatnonzero(coef).astype(np.int32)
        path = _save(fit_dir, "quality_classifier", {
            "index": index, "value": coef[index].astype(np.float32),
            "intercept": np.array([fitted.intercept_[0]], dtype=np.float64),
            "shape": np.array([config.ngram_max, config.features], dtype=np.int64),
        })
        return {"weights": path}

    def probability(self, text: str) -> float:
        """P(noisy) of one text."""
        if self._model is None:
            raise UserError("quality_classifier: not fitted (the data pipeline fits it before the stream runs)")
        vectorizer, coef, intercept = self._model
        score = float((vectorizer.transform([text]) @ coef)[0]) + intercept
        return float(1 / (1 + np.exp(-score)))

    def reject(self, text: str) -> Optional[str]:
        p = self.probability(text)
        return f"P(noisy) {p:.3f} ≥ {self.config.min_confidence}" if p >= self.config.min_confidence else None


# ---------------------------------------------------------------------------------------------- coverage


class CoverageConfig(OpConfig):
    clusters: int = Field(16, ge=2, le=256, description="k of the k-means over the fit sample.")
    rare_share: float = Field(0.02, gt=0, lt=1, description="A cluster holding less than this share of the fit sample is rare.")
    ngram_max: int = Field(3, ge=1, le=6, description="Features: hashed character n-grams of 1 to this many characters.")
    features: int = Field(1 << 12, ge=1 << 6, le=1 << 16, description="Hashed feature slots (the centroids are dense).")
    seed: int = Field(0, description="Seed of the k-means.")
    tag: str = Field("rare_cluster", min_length=1, description="The tag a text in a rare cluster gets.")
    centroids: Optional[InputPath] = Field(
        None, description="The fitted clusters: an .npz of centroids and rare flags written by the fit into the "
        "run's fitted/ folder (set it to reuse one; then nothing is fitted).",
    )


@register("coverage")
class Coverage(Filter):
    """Find the long tail (a fitted step, see above): k-means (scikit-learn, fixed seed) over hashed
    character n-grams of the fit sample; clusters holding less than `rare_share` of it are rare, and each
    text nearest a rare cluster's centroid is tagged (`coverage:rare_cluster` in the stats' `tags`) as a
    candidate for oversampling. Never drops nor rewrites."""

    Config = CoverageConfig
    fits = True

    def __init__(self, config: CoverageConfig):
        super().__init__(config)
        self._model: Optional[tuple[Any, np.ndarray, np.ndarray, np.ndarray]] = None
        if config.centroids is not None:
            arrays = _load(config.centroids, "coverage.centroids", ("centroids", "rare", "shape"))
            ngram_max, features = (int(v) for v in arrays["shape"])
            centroids = arrays["centroids"].astype(np.float64)
            if centroids.shape[1] != features:
                raise UserError(f"coverage.centroids: {config.centroids}: centroids of width {centroids.shape[1]}, "
                                f"expected {features}")
            self._model = (_vectorizer(ngram_max, features), centroids, (centroids ** 2).sum(axis=1),
                           arrays["rare"].astype(bool))

    def needs_fit(self) -> bool:
        return self.config.centroids is None

    def fit(self, texts: list[str], rule_noisy: list[bool], fit_dir: Path) -> dict[str, Any]:
        from sklearn.cluster import KMeans

        config = self.config
        k = min(config.clusters, len(texts))
        if k < 2:
            raise UserError(f"coverage: the fit sample has {len(texts)} texts; it needs at least 2 (raise fit_sample)")
        features = _vectorizer(config.ngram_max, config.features).transform(texts)
        # Exact k-means (a fit sample is small): MiniBatchKMeans, on a few hundred texts, may split the head
        # and leave a distinct tail inside it.
        kmeans = KMeans(n_clusters=k, random_state=config.seed, n_init=4).fit(features)
        sizes = np.bincount(kmeans.labels_, minlength=k)
        rare = sizes < config.rare_share * len(texts)
        path = _save(fit_dir, "coverage", {
            "centroids": kmeans.cluster_centers_.astype(np.float32), "rare": rare, "sizes": sizes.astype(np.int64),
            "shape": np.array([config.ngram_max, config.features], dtype=np.int64),
        })
        return {"centroids": path}

    def cluster(self, text: str) -> tuple[int, bool]:
        """(nearest cluster, whether it is rare)."""
        if self._model is None:
            raise UserError("coverage: not fitted (the data pipeline fits it before the stream runs)")
        vectorizer, centroids, norms, rare = self._model
        scores = norms - 2 * np.asarray(vectorizer.transform([text]) @ centroids.T).ravel()
        nearest = int(np.argmin(scores))
        return nearest, bool(rare[nearest])

    def reject(self, text: str) -> Optional[str]:
        return None

    def tags(self, text: str) -> list[str]:
        return [self.config.tag] if self.cluster(text)[1] else []
