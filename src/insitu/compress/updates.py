"""Update compression at the site: fewer values, fewer bits, no lost signal over rounds.

What a site sends is already a *delta* against the last global model
(Δ = w_local − w_global, computed in :mod:`insitu.federation.site`), which is
why sparsifying and quantizing it works: most coordinates of Δ are small.
Three operators, composable as ``topk:F+int8`` or ``shared:F+int8``:

* **int8** — blockwise symmetric quantization with *stochastic rounding*:
  ``x/s`` is rounded up with probability equal to its fractional part, so
  ``E[q·s] = x`` (unbiased), and averaging over sites averages the error away.
* **topk:F** — keep the ``⌈F·n⌉`` largest-magnitude coordinates.  Biased on its
  own, so it runs with *error feedback* (Seide et al. 2014; Stich et al. 2018):
  what was not sent this round is kept at the site and added to the next
  update, so every coordinate's signal eventually leaves.
* **shared:F** — keep ``⌈F·n⌉`` coordinates chosen by a seed derived from the
  job and round number, identical at every site.  This is the variant that
  composes with secure aggregation: masks cancel only when all sites mask the
  same coordinates, so the protocol masks (and sends) just those values.
  Error feedback as for top-k.

The stage here is the lossy part (stochastic, stateful); the wire format is
:mod:`insitu.compress.codec`, which encodes this stage's output exactly.
"""
from __future__ import annotations

import enum
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from insitu.errors import ConfigError

#: int8 quantization uses the symmetric range [-127, 127] (no -128: keeps it symmetric).
QMAX = 127
#: values per quantization scale in dense int8; 4 bytes of scale per 256 values is 1.6 % overhead.
DEFAULT_BLOCK = 256


class Sparsifier(str, enum.Enum):
    NONE = "none"
    TOPK = "topk"
    SHARED = "shared"


class Quantizer(str, enum.Enum):
    FLOAT32 = "float32"
    INT8 = "int8"


@dataclass(frozen=True)
class CompressionSpec:
    """What ``--compress`` asked for: ``none``, ``int8``, ``topk:0.01``, ``shared:0.01``,
    ``topk:0.01+int8``, ``shared:0.01+int8``."""

    sparsify: Sparsifier = Sparsifier.NONE
    fraction: float = 1.0
    quantize: Quantizer = Quantizer.FLOAT32
    error_feedback: bool = True
    block: int = DEFAULT_BLOCK

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparsify", Sparsifier(self.sparsify))
        object.__setattr__(self, "quantize", Quantizer(self.quantize))
        if not (0.0 < self.fraction <= 1.0) or not math.isfinite(self.fraction):
            raise ConfigError(f"compression fraction must be in (0, 1], got {self.fraction!r}; e.g. topk:0.01 keeps 1 %")
        if self.sparsify is Sparsifier.NONE and self.fraction != 1.0:
            raise ConfigError(f"fraction {self.fraction} given without a sparsifier; write topk:{self.fraction:g} or shared:{self.fraction:g}")
        if not 1 <= self.block <= 1 << 20:
            raise ConfigError(f"quantization block must be between 1 and 2^20 values, got {self.block}")

    @classmethod
    def parse(cls, text: str | None) -> "CompressionSpec":
        if text is None or text.strip().lower() in ("", "none", "float32", "dense"):
            return cls()
        sparsify, fraction, quantize = Sparsifier.NONE, 1.0, Quantizer.FLOAT32
        for part in text.lower().replace(" ", "").split("+"):
            name, _, arg = part.partition(":")
            if name == Quantizer.INT8.value and not arg:
                if quantize is not Quantizer.FLOAT32:
                    raise ConfigError(f"compression {text!r} names int8 twice")
                quantize = Quantizer.INT8
            elif name in (Sparsifier.TOPK.value, Sparsifier.SHARED.value):
                if sparsify is not Sparsifier.NONE:
                    raise ConfigError(f"compression {text!r} names two sparsifiers; use one of topk:F or shared:F")
                try:
                    fraction = float(arg)
                except ValueError:
                    raise ConfigError(f"compression {text!r}: {name} needs a fraction, e.g. {name}:0.01") from None
                sparsify = Sparsifier(name)
            else:
                raise ConfigError(f"unknown compression {part!r} in {text!r}; use int8, topk:F, shared:F or a sum like topk:0.01+int8")
        return cls(sparsify, fraction, quantize)

    def __str__(self) -> str:
        parts = []
        if self.sparsify is not Sparsifier.NONE:
            parts.append(f"{self.sparsify.value}:{self.fraction:g}")
        if self.quantize is not Quantizer.FLOAT32:
            parts.append(self.quantize.value)
        return "+".join(parts) or "none"

    @property
    def is_identity(self) -> bool:
        return self.sparsify is Sparsifier.NONE and self.quantize is Quantizer.FLOAT32

    def k(self, size: int) -> int:
        """How many coordinates a sparsifier keeps out of ``size``."""
        return size if self.sparsify is Sparsifier.NONE else max(1, min(size, math.ceil(self.fraction * size)))


# -- pure math -------------------------------------------------------------------------------


def stochastic_round(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Round each value to a neighbouring integer, up with probability equal to its fractional
    part; ``E[stochastic_round(x)] = x`` exactly, which nearest rounding does not give."""
    x = np.asarray(x, dtype=np.float64)
    low = np.floor(x)
    return low + (rng.random(x.shape) < (x - low))


def _scales(x: np.ndarray, block: int) -> np.ndarray:
    n = x.shape[0]
    nb = max(1, -(-n // block))
    padded = np.zeros(nb * block)
    padded[:n] = np.abs(x)
    return padded.reshape(nb, block).max(axis=1) / QMAX


def quantize_int8(x: np.ndarray, block: int, rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric blockwise int8: returns ``(q, scales)`` with ``x ≈ q · scale[block]``.

    With ``rng`` the rounding is stochastic (unbiased); without, nearest (deterministic, what the
    wire encoder uses).  The largest value of each block maps to exactly ±127 either way, so that
    re-quantizing a dequantized vector, even after multiplying it by a site weight, is lossless.
    """
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    n = x.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int8), np.zeros(0, dtype=np.float32)
    scales = _scales(x, block)
    per = np.repeat(scales, block)[:n]
    safe = np.where(per > 0, per, 1.0)
    y = x / safe
    r = stochastic_round(y, rng) if rng is not None else np.rint(y)
    q = np.clip(r, -QMAX, QMAX)
    # pin each block's extreme to ±127 (x/s is 127 up to float error; stochastic rounding of
    # 126.9999999 would otherwise move it with probability 1e-7 and break exact re-encoding)
    nb = scales.shape[0]
    padded = np.zeros(nb * block)
    padded[:n] = np.abs(x)
    top = np.arange(nb) * block + padded.reshape(nb, block).argmax(axis=1)
    top = top[scales > 0]
    q[top] = np.where(x[top] > 0, QMAX, -QMAX)
    return q.astype(np.int8), scales.astype(np.float32)


def dequantize_int8(q: np.ndarray, scales: np.ndarray, block: int) -> np.ndarray:
    n = q.shape[0]
    return q.astype(np.float64) * np.repeat(scales.astype(np.float64), block)[:n]


def topk_indices(x: np.ndarray, k: int) -> np.ndarray:
    """Sorted indices of the ``k`` largest-magnitude values."""
    n = x.shape[0]
    if k >= n:
        return np.arange(n)
    idx = np.argpartition(np.abs(x), n - k)[n - k :]
    return np.sort(idx)


def shared_indices(job: str, round_: int, size: int, k: int) -> np.ndarray:
    """The index set every site uses in round ``round_`` of ``job``: sorted, ``k`` distinct
    coordinates of ``range(size)``.

    Derived from SHAKE-256 over (job, round, size, k), not from a library RNG, so that sites on
    different machines and numpy versions draw the same set.  Each coordinate gets a 64-bit key
    from the hash stream; the ``k`` smallest keys win (ties, ~1e-10 likely, break by index).
    """
    if not 1 <= k <= size:
        raise ConfigError(f"shared index set of {k} coordinates cannot be drawn from {size}")
    if k == size:
        return np.arange(size)
    seed = f"insitu/shared-indices/v1\x00{job}\x00{int(round_)}\x00{int(size)}\x00{int(k)}".encode()
    keys = np.frombuffer(hashlib.shake_256(seed).digest(8 * size), dtype="<u8")
    order = np.argsort(keys, kind="stable")
    return np.sort(order[:k])


# -- the site stage ----------------------------------------------------------------------------


@dataclass
class UpdateCompressor:
    """The ``compress`` stage of :class:`insitu.federation.pipeline.SitePipeline`.

    Keeps one error-feedback residual per job (a site may serve several jobs); the residual
    never leaves the site.  Its output is a dense float vector that holds exactly what the
    coordinator will reconstruct, so clipping/noise accounting upstream stays valid and the
    codec downstream can encode it without further loss.
    """

    spec: CompressionSpec
    seed: int = 0
    _rng: np.random.Generator = field(init=False, repr=False)
    _residual: dict[str, np.ndarray] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng([int(self.seed) & 0xFFFFFFFF, 0x1A5])

    def residual(self, job: str) -> np.ndarray | None:
        r = self._residual.get(job)
        return None if r is None else r.copy()

    @property
    def uses_feedback(self) -> bool:
        return self.spec.error_feedback and self.spec.sparsify is not Sparsifier.NONE

    def compress(self, x: np.ndarray, job: str, round_: int) -> np.ndarray:
        """One round's lossy compression of ``x`` (no residual bookkeeping)."""
        spec, n = self.spec, x.shape[0]
        out = np.zeros(n, dtype=np.float64)
        if spec.sparsify is Sparsifier.NONE:
            idx = None
            vals = x
        else:
            k = spec.k(n)
            idx = topk_indices(x, k) if spec.sparsify is Sparsifier.TOPK else shared_indices(job, round_, n, k)
            vals = x[idx]
        if spec.quantize is Quantizer.INT8:
            # top-k values travel as nonzeros with one scale; dense and shared use positional blocks
            block = max(1, vals.shape[0]) if spec.sparsify is Sparsifier.TOPK else spec.block
            q, s = quantize_int8(vals, block, self._rng)
            vals = dequantize_int8(q, s, block)
        if idx is None:
            out[:] = vals
        else:
            out[idx] = vals
        return out

    def apply(self, vec: np.ndarray, request: Any, info: dict[str, Any]) -> np.ndarray:
        x = np.asarray(vec, dtype=np.float64).reshape(-1)
        job, rnd = str(getattr(request, "job", "")), int(getattr(request, "round", 0))
        if self.uses_feedback:
            r = self._residual.get(job)
            if r is not None and r.shape == x.shape:
                x = x + r
        out = self.compress(x, job, rnd)
        if self.uses_feedback:
            self._residual[job] = x - out
            info["ef_residual_norm"] = float(np.linalg.norm(self._residual[job]))
        info["compress"] = str(self.spec)
        info["compress_kept"] = int(np.count_nonzero(out))
        return out


__all__ = [
    "CompressionSpec",
    "Sparsifier",
    "Quantizer",
    "UpdateCompressor",
    "stochastic_round",
    "quantize_int8",
    "dequantize_int8",
    "topk_indices",
    "shared_indices",
    "QMAX",
    "DEFAULT_BLOCK",
]
