"""Reading packed token files: fixed-length blocks of a flat uint16/uint32 file, memory-mapped (docs/CONTRACTS.md)."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lab import LabError


class PackedBlocks(Dataset):
    """Fixed-length blocks of a flat token file, memory-mapped (nothing is read until indexed)."""

    def __init__(self, path: Path, seq_len: int, dtype: str, expected_blocks: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise LabError(f"packed token file not found: {self.path}")
        self.seq_len = seq_len
        self.dtype = np.dtype(dtype)
        n_tokens = self.path.stat().st_size // self.dtype.itemsize
        self.n_blocks = n_tokens // seq_len
        if expected_blocks is not None and (self.n_blocks != expected_blocks
                                            or self.path.stat().st_size != expected_blocks * seq_len * self.dtype.itemsize):
            # a cut or grown file must never train (or evaluate) silently on part of the data
            raise LabError(f"{self.path} holds {self.path.stat().st_size:,} bytes, not the {expected_blocks:,} blocks "
                           "its manifest records: the prepared data is damaged; re-run lab.prepare")

    @cached_property
    def _tokens(self) -> np.ndarray:
        # Opened lazily so a DataLoader worker maps the file itself instead of pickling a map.
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n_blocks * self.seq_len,))

    def __len__(self) -> int:
        return self.n_blocks

    def __getitem__(self, index: int) -> torch.Tensor:
        start = int(index) * self.seq_len
        block = self._tokens[start : start + self.seq_len]
        return torch.from_numpy(block.astype(np.int64))  # [seq_len]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_tokens", None)
        return state
