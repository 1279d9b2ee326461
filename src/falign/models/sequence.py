"""Plain-PyTorch attention and recurrent models for the architecture benchmark (converted by
:func:`falign.convert` like any other model)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["CharLM", "PatchViT", "RowRNN"]


class PatchViT(nn.Module):
    """A small Vision Transformer: non-overlapping ``patch×patch`` patches of a square one-channel image, a linear
    patch embedding with learned positions and a class token, ``depth`` pre-norm ``nn.TransformerEncoderLayer``
    blocks, a linear classifier on the class token.

    Input ``(N, side·side)`` or ``(N, 1, side, side)``; output ``(N, classes)``."""

    def __init__(self, side: int, patch: int, classes: int, dim: int = 64, depth: int = 2, heads: int = 4) -> None:
        super().__init__()
        if side % patch:
            raise ValueError(f"image side {side} is not a multiple of the patch size {patch}")
        self.side, self.patch = side, patch
        count = (side // patch) ** 2
        self.embed = nn.Linear(patch * patch, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, count + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        n, p = x.shape[0], self.patch
        img = x.reshape(n, self.side, self.side)
        patches = img.unfold(1, p, p).unfold(2, p, p).reshape(n, -1, p * p)
        tokens = torch.cat([self.cls.expand(n, 1, -1), self.embed(patches)], 1) + self.pos
        return self.head(self.norm(self.encoder(tokens)[:, 0]))


class RowRNN(nn.Module):
    """Reads a square one-channel image row by row (each row one time step) with ``cell`` (``nn.LSTM``,
    ``nn.GRU``, ``nn.RNN``) and classifies from the last hidden state.

    Input ``(N, side·side)`` or ``(N, 1, side, side)``; output ``(N, classes)``."""

    def __init__(self, side: int, classes: int, cell: type[nn.RNNBase] = nn.LSTM, hidden: int = 64) -> None:
        super().__init__()
        self.side = side
        self.rnn = cell(side, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(x.shape[0], self.side, self.side)
        return self.head(self.rnn(rows)[0][:, -1])


class CharLM(nn.Module):
    """A character-level language model: embedding, one ``nn.LSTM`` layer, a linear read-out at every position.

    Input ``(N, T)`` character indices; output ``(N, T, vocab)`` next-character logits."""

    def __init__(self, vocab: int, width: int = 32, hidden: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.rnn = nn.LSTM(width, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(self.embed(x))[0])
