"""Where the KV lives: the host store (the whole cache, CPU) and the device-side buffers.

Host layout is token-major with K and V side by side, [layers, max_len, B, Hkv, K|V, d] (as
FlexGen's [n, b*h, d], K and V interleaved): appending one token is one contiguous write, a full
layer's prefix is one contiguous copy, and a selected token of (sequence b, kv head g) is one
row of 2*d values (its key and its value) in the [max_len*B*Hkv, 2*d] view, so the gather does
one random access per token and head, not two.
On CUDA the store is page-locked with cudaHostRegister rather than torch's pinned allocator,
which rounds every block up to a power of two (a 9 GB store would pin 16 GB); it is allocated
once per shape and reused by every batch of a cell (pinning costs about a second per few GB).
"""

from __future__ import annotations

import torch


class HostStore:
    def __init__(self, n_layers: int, max_len: int, batch: int, kv_heads: int, head_dim: int, dtype, pin: bool):
        self.shape = (n_layers, max_len, batch, kv_heads, 2, head_dim)
        self.kv = torch.empty(self.shape, dtype=dtype)
        self._registered = False
        if pin:
            err = torch.cuda.cudart().cudaHostRegister(self.kv.data_ptr(), self.nbytes, 1)  # portable
            if int(err) != 0:
                raise RuntimeError(f"cudaHostRegister of {self.nbytes / 1e9:.1f} GB failed (error {int(err)})")
            self._registered = True

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def fits(self, n_layers, max_len, batch, kv_heads, head_dim, dtype) -> bool:
        """Usable for a batch of max_len tokens (a longer store works: rows do not depend on it)."""
        n, length, b, h, _, d = self.shape
        return (n, b, h, d) == (n_layers, batch, kv_heads, head_dim) and length >= max_len and self.kv.dtype == dtype

    @property
    def batch(self) -> int:
        return self.shape[2]

    def append(self, layer: int, start: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """key/value [B, Hkv, n, d] (device) -> host tokens start..start+n: one copy, async on
        CUDA (ordered on the current stream; readers wait on an event recorded after it)."""
        n = key.shape[2]
        kv = torch.stack((key, value), dim=3).permute(2, 0, 1, 3, 4).contiguous()  # [n, B, Hkv, 2, d]
        self.kv[layer, start:start + n].copy_(kv, non_blocking=True)

    def rows(self, layer: int) -> torch.Tensor:
        """[max_len*B*Hkv, 2*d] view: one row = one token's key and value for one kv head."""
        return self.kv[layer].view(-1, 2 * self.shape[-1])

    def prefix(self, layer: int, length: int) -> torch.Tensor:
        """Tokens 0..length as [length, B, Hkv, 2, d] (contiguous)."""
        return self.kv[layer, :length]

    def keys_values(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views [B, Hkv, length, d] of a layer's keys and values."""
        p = self.prefix(layer, length)
        return p[..., 0, :].permute(1, 2, 0, 3), p[..., 1, :].permute(1, 2, 0, 3)

    def close(self) -> None:
        if self._registered:
            torch.cuda.cudart().cudaHostUnregister(self.kv.data_ptr())
            self._registered = False

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: CUDA may be gone already
            pass


class Slot:
    """One of two rotating fetch buffers for the speculated layers (layer j uses slot j % 2):
    device rows, their pinned staging copy and the pinned selection (idx, k) read by the gather.
    Two suffice: layer j+2 reuses j's slot only after j's attention (stream order) and after j's
    copy finished (event)."""

    def __init__(self, rows: int, head_dim: int, dtype, device: torch.device, cuda: bool):
        self.dev = torch.zeros((rows, 2 * head_dim), dtype=dtype, device=device)  # never NaN, even unfetched
        self.stage = torch.empty((rows, 2 * head_dim), dtype=dtype, pin_memory=True) if cuda else None
        self.idx = torch.empty(rows, dtype=torch.long, pin_memory=cuda)
        self.k = torch.empty((), dtype=torch.long, pin_memory=cuda)
        self.copied = None  # event: the last host->device copy out of `stage` is done

    @property
    def nbytes(self) -> int:
        return self.dev.numel() * self.dev.element_size()
