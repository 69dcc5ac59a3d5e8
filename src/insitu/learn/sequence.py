"""Recurrent models for irregularly sampled clinical time series (PhysioNet 2012 and alike).

Both take a record as a ``[T, 3V]`` tensor (see :mod:`insitu.data.physionet`): ``V`` normalised
values (0 where unobserved, i.e. the public mean), ``V`` observation masks and ``V`` hours since
each variable was last observed, and return one logit (``num_outputs`` logits in general).

Both are written with ``nn.Linear`` cells rather than ``nn.LSTM``/``nn.GRU`` so that record-level
DP-SGD can clip per-sample gradients (:mod:`insitu.learn.dpsgd`): the input projections run once
on the whole sequence and the hidden-to-hidden layer runs once per time step, a weight shared
across steps whose per-sample gradient is the sum over steps.

* :class:`LSTMClassifier`: an LSTM over (last observed value, mask, log(1 + δ)), i.e. forward
  filling, with the masks and gaps as extra inputs ("GRU-simple" of Che et al. with an LSTM cell).
* :class:`GRUD`: GRU-D (Che, Purushotham, Cho, Sontag, Liu, "Recurrent Neural Networks for
  Multivariate Time Series with Missing Values", Scientific Reports 8, 6085, 2018).  A missing
  input decays from its last observed value toward the empirical mean, with a trainable rate per
  variable, γₓ = exp(−max(0, wₓ ⊙ δ + bₓ)); the hidden state decays before every step,
  γₕ = exp(−max(0, Wₕ δ + bₕ)); the masks are inputs to the gates.  The empirical mean is the
  public reference mean, which is 0 after normalisation, so x̂ = m·x + (1 − m)·γₓ·x_last.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from insitu.errors import ConfigError

HIDDEN = 32  # GRU-D FedAvg on the validation splits: 32 reached 0.878 AUROC, 64 peaked at 0.876 and overfit
DROPOUT = 0.0  # on the last hidden state, before the head (training only)


class Diagonal(nn.Module):
    """``y = x ⊙ w + b`` over the last axis: one weight and bias per feature (GRU-D's input decay)."""

    def __init__(self, features: int):
        super().__init__()
        bound = 1.0 / math.sqrt(features)
        self.weight = nn.Parameter(torch.empty(features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(features).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.bias


def _variables(input_shape: tuple[int, ...]) -> int:
    if len(input_shape) != 2 or input_shape[1] % 3 or input_shape[1] == 0:
        raise ConfigError(f"sequence models need records of shape (T, 3V): values, masks and time gaps of V variables; got {input_shape}")
    return input_shape[1] // 3


def split_inputs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, masks, time gaps), each ``[B, T, V]``."""
    v = x.shape[-1] // 3
    return x[..., :v], x[..., v : 2 * v], x[..., 2 * v :]


def last_observed(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each variable's most recent observed value at every step (0, the public mean, before the first)."""
    T = values.shape[1]
    steps = torch.arange(T, device=values.device).view(1, T, 1).expand_as(mask)
    last = torch.where(mask > 0, steps, torch.full_like(steps, -1)).cummax(dim=1).values
    filled = values.gather(1, last.clamp(min=0))
    return torch.where(last >= 0, filled, torch.zeros_like(filled))


class LSTMClassifier(nn.Module):
    """An LSTM (Hochreiter & Schmidhuber 1997) over forward-filled values, masks and log time gaps;
    the last hidden state feeds a linear head."""

    def __init__(self, input_shape: tuple[int, ...], num_outputs: int, hidden: int = HIDDEN, dropout: float = DROPOUT):
        super().__init__()
        v = _variables(input_shape)
        self.hidden_size = hidden
        self.dropout = nn.Dropout(dropout)
        self.input = nn.Linear(3 * v, 4 * hidden)
        self.recurrent = nn.Linear(hidden, 4 * hidden, bias=False)
        self.head = nn.Linear(hidden, num_outputs)
        with torch.no_grad():  # forget gate open at the start (Jozefowicz et al. 2015); gates: i, f, o, g
            self.input.bias[hidden : 2 * hidden].fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values, mask, delta = split_inputs(x)
        feats = torch.cat([last_observed(values, mask), mask, torch.log1p(delta)], dim=-1)
        pre = self.input(feats).transpose(0, 1)  # T, B, 4H: once for the whole sequence
        H = self.hidden_size
        h = pre.new_zeros(pre.shape[1], H)
        c = h
        for x in pre:  # gates in the order input, forget, output | candidate: one sigmoid, one tanh
            gates = x + self.recurrent(h)
            ifo = torch.sigmoid(gates[:, : 3 * H])
            c = ifo[:, H : 2 * H] * c + ifo[:, :H] * torch.tanh(gates[:, 3 * H :])
            h = ifo[:, 2 * H :] * torch.tanh(c)
        return self.head(self.dropout(h))


class GRUD(nn.Module):
    """GRU-D (Che et al. 2018), with the PyTorch GRU cell (reset gate applied after the
    hidden-to-hidden product, as cuDNN does)."""

    def __init__(self, input_shape: tuple[int, ...], num_outputs: int, hidden: int = HIDDEN, dropout: float = DROPOUT):
        super().__init__()
        v = _variables(input_shape)
        self.hidden_size = hidden
        self.dropout = nn.Dropout(dropout)
        self.input_decay = Diagonal(v)
        self.hidden_decay = nn.Linear(v, hidden)
        self.input = nn.Linear(2 * v, 3 * hidden)  # [x̂, m] → reset, update, candidate
        self.recurrent = nn.Linear(hidden, 3 * hidden)
        self.head = nn.Linear(hidden, num_outputs)

    def decays(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(γₓ ``[B, T, V]``, γₕ ``[B, T, H]``), each in (0, 1], 1 at δ = 0 when the bias is ≤ 0."""
        gx = torch.exp(-torch.relu(self.input_decay(delta)))
        gh = torch.exp(-torch.relu(self.hidden_decay(delta)))
        return gx, gh

    def impute(self, values: torch.Tensor, mask: torch.Tensor, gamma_x: torch.Tensor) -> torch.Tensor:
        """x̂: the observation where there is one, else the last one decayed toward the mean (0)."""
        return mask * values + (1 - mask) * gamma_x * last_observed(values, mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values, mask, delta = split_inputs(x)
        gx, gh = self.decays(delta)
        pre = self.input(torch.cat([self.impute(values, mask, gx), mask], dim=-1)).transpose(0, 1)  # T, B, 3H
        H = self.hidden_size
        h = pre.new_zeros(pre.shape[1], H)
        for x, decay in zip(pre, gh.transpose(0, 1)):  # gates in the order reset, update | candidate
            h = decay * h
            hh = self.recurrent(h)
            rz = torch.sigmoid(x[:, : 2 * H] + hh[:, : 2 * H])
            n = torch.tanh(x[:, 2 * H :] + rz[:, :H] * hh[:, 2 * H :])
            h = n + rz[:, H:] * (h - n)  # (1 − z)·n + z·h
        return self.head(self.dropout(h))


__all__ = ["Diagonal", "GRUD", "LSTMClassifier", "last_observed", "split_inputs"]
