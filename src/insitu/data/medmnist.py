"""MedMNIST ``.npz`` files (e.g. PneumoniaMNIST) split across simulated hospitals.

The file must hold ``train_images``, ``train_labels``, ``test_images`` and
``test_labels`` (``val_*`` optional), as MedMNIST ships them.  Each site gets a
share of the training images by the chosen partition and a share of the test
images drawn with the *same* label proportions, so its test split looks like its
patients; the union of the sites' test splits is the whole official test set.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from insitu.data.dataset import FederatedData, SiteData
from insitu.data.partition import Partition, PartitionKind, split_indices
from insitu.data.origins import MEDMNIST_ORIGIN
from insitu.errors import DataError

REQUIRED = ("train_images", "train_labels", "test_images", "test_labels")


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"MedMNIST file {str(path)!r} does not exist; pass --data PATH to a MedMNIST .npz ({MEDMNIST_ORIGIN})")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in REQUIRED if k not in z.files]
            if missing:
                raise DataError(f"{str(path)!r} is not a MedMNIST .npz: it lacks {missing} (has {sorted(z.files)})")
            arrays = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise DataError(f"{str(path)!r} cannot be read as .npz: {exc}") from None
    for split in ("train", "test"):
        imgs, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"].reshape(-1)
        if imgs.ndim not in (3, 4) or imgs.shape[0] != labels.shape[0]:
            raise DataError(f"{str(path)!r}: {split}_images has shape {imgs.shape} but {split}_labels has {labels.shape[0]} labels")
    return arrays


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    x = torch.tensor(images, dtype=torch.float32) / 255.0
    if x.dim() == 4:  # (N, H, W, C) → (N, C, H, W)
        x = x.permute(0, 3, 1, 2)
    else:
        x = x.unsqueeze(1)
    return (x - 0.5) / 0.5


def load_medmnist(path: str | Path, n_sites: int, partition: Partition, seed: int = 0, name: str | None = None) -> FederatedData:
    if partition.kind is PartitionKind.NATURAL:
        raise DataError("MedMNIST has no natural hospital split; use --partition iid or dirichlet:ALPHA")
    arrays = load_npz(path)
    rng = np.random.default_rng(seed)
    ytr = arrays["train_labels"].reshape(-1).astype(int)
    yte = arrays["test_labels"].reshape(-1).astype(int)
    classes = int(max(ytr.max(), yte.max()) + 1)
    train_parts = split_indices(ytr, n_sites, partition, rng)
    def follow_train(labels: np.ndarray) -> list[np.ndarray]:
        """Split held-out images so that each site's share follows its train label proportions."""
        parts: list[list[int]] = [[] for _ in range(n_sites)]
        for c in range(classes):
            idx = rng.permutation(np.flatnonzero(labels == c))
            share = np.array([np.sum(ytr[p] == c) for p in train_parts], dtype=float)
            share = share / share.sum() if share.sum() > 0 else np.full(n_sites, 1 / n_sites)
            cuts = np.round(np.cumsum(share) * len(idx)).astype(int)[:-1]
            for site, chunk in enumerate(np.split(idx, cuts)):
                parts[site].extend(chunk.tolist())
        return [np.sort(np.array(p, dtype=int)) for p in parts]

    test_parts = follow_train(yte)
    has_val = "val_images" in arrays and "val_labels" in arrays
    yva = arrays["val_labels"].reshape(-1).astype(int) if has_val else None
    val_parts = follow_train(yva) if has_val else [None] * n_sites
    Xtr, Xte = _to_tensor(arrays["train_images"]), _to_tensor(arrays["test_images"])
    Xva = _to_tensor(arrays["val_images"]) if has_val else None
    sites = []
    for i, (ptr, pte, pva) in enumerate(zip(train_parts, test_parts, val_parts)):
        val = (Xva[pva], torch.tensor(yva[pva], dtype=torch.float32)) if has_val else (None, None)
        sites.append(SiteData(f"hospital-{i + 1}", Xtr[ptr], torch.tensor(ytr[ptr], dtype=torch.float32), Xte[pte], torch.tensor(yte[pte], dtype=torch.float32), *val))
    shape = tuple(Xtr.shape[1:])
    return FederatedData(name or Path(path).stem, tuple(sites), shape, classes, ("image",), {"partition": str(partition), "train": len(ytr), "test": len(yte)})
