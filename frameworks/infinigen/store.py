"""Where the KV lives: the host store (the whole cache, CPU) and the device-side buffers.

Host layout is token-major with K and V side by side, [layers, max_len, B, Hkv, K|V, d] (as
FlexGen's [n, b*h, d], K and V interleaved): appending one token is one contiguous write, a full
layer's prefix is one contiguous copy, and a selected token of (sequence b, kv head g) is one
row of 2*d values (its key and its value) in the [max_len*B*Hkv, 2*d] view, so the gather does
one random access per token and head, not two.
On CUDA the store is page-locked with cudaHostRegister rather than torch's pinned allocator,
which rounds every block up to a power of two (a 9 GB store would pin 16 GB); it is allocated
once per shape and reused by every batch of a cell (pinning costs about a second per few GB).
It is registered as mapped, and `device_view` makes a CUDA tensor aliasing it (unified virtual
addressing): a GPU kernel (index_select) then reads only the selected rows over PCIe, with no
CPU gather and no staging buffer.
"""

from __future__ import annotations

import ctypes

import torch

_HOST_REGISTER_PORTABLE, _HOST_REGISTER_MAPPED = 1, 2
_CU_POINTER_ATTRIBUTE_DEVICE_POINTER = 3
_INT_OF_SIZE = {1: (torch.uint8, "|u1"), 2: (torch.int16, "<i2"), 4: (torch.int32, "<i4"), 8: (torch.int64, "<i8")}


def _device_pointer(ptr: int) -> int | None:
    """The device address of a page-locked host address, from the driver (None: no libcuda)."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    out = ctypes.c_uint64(0)
    err = lib.cuPointerGetAttribute(ctypes.byref(out), ctypes.c_int(_CU_POINTER_ATTRIBUTE_DEVICE_POINTER),
                                    ctypes.c_uint64(ptr))
    if err != 0:
        raise RuntimeError(f"host address {ptr:#x} is not device-accessible (cuPointerGetAttribute error {err}): "
                           "register it mapped (cudaHostRegister with cudaHostRegisterMapped) or use pin_memory()")
    return out.value


def device_view(host: torch.Tensor, device: torch.device | str = "cuda") -> torch.Tensor:
    """A CUDA tensor of host's shape and dtype aliasing host's page-locked memory (zero-copy:
    kernels reading it read host memory over PCIe). `host` must stay alive (and registered) as
    long as the view is used. Raises RuntimeError if the memory is not device-accessible.

    The device address comes from the driver (cuPointerGetAttribute); without a driver library
    to ask, a page-locked tensor's own address is used (unified virtual addressing maps it 1:1)."""
    if host.device.type != "cpu" or not host.is_contiguous():
        raise RuntimeError("device_view needs a contiguous CPU tensor")
    ptr = _device_pointer(host.data_ptr())
    if ptr is None:
        if not host.is_pinned():
            raise RuntimeError("device_view: the host tensor is not page-locked (cudaHostRegister / pin_memory), "
                               "so a GPU kernel cannot read it")
        ptr = host.data_ptr()
    int_dtype, typestr = _INT_OF_SIZE[host.element_size()]  # the interface has no bfloat16
    iface = {"shape": tuple(host.shape), "typestr": typestr, "data": (ptr, False), "version": 3, "strides": None}
    holder = type("HostAlias", (), {"__cuda_array_interface__": iface})()
    view = torch.as_tensor(holder, device=device)
    if view.dtype != int_dtype or view.data_ptr() != ptr:  # a copy, not an alias
        raise RuntimeError(f"device_view: got {view.dtype} at {view.data_ptr():#x}, expected {int_dtype} at {ptr:#x}")
    return view.view(host.dtype)


class HostStore:
    def __init__(self, n_layers: int, max_len: int, batch: int, kv_heads: int, head_dim: int, dtype, pin: bool,
                 device: torch.device | str = "cuda", zero: bool = False):
        self.shape = (n_layers, max_len, batch, kv_heads, 2, head_dim)
        # zero: graph decode reads rows not written yet (masked: they must be finite, never NaN)
        self.kv = (torch.zeros if zero else torch.empty)(self.shape, dtype=dtype)
        self._registered = False
        self.dev = None  # CUDA: device_view(self.kv)
        if pin:
            flags = _HOST_REGISTER_PORTABLE | _HOST_REGISTER_MAPPED
            err = torch.cuda.cudart().cudaHostRegister(self.kv.data_ptr(), self.nbytes, flags)
            if int(err) != 0:
                raise RuntimeError(f"cudaHostRegister of {self.nbytes / 1e9:.1f} GB failed (error {int(err)})")
            self._registered = True
            self.dev = device_view(self.kv, device)

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

    @staticmethod
    def pack(key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """key/value [B, Hkv, n, d] -> [n, B, Hkv, 2, d]: the store's token-major layout, one
        stack kernel on the tensors' device."""
        return torch.stack((key.permute(2, 0, 1, 3), value.permute(2, 0, 1, 3)), dim=3)

    def write(self, layer: int, start: int, kv: torch.Tensor) -> None:
        """Packed tokens (see pack) -> host tokens start..start+n of a layer: one copy, async on
        CUDA (ordered on the current stream; Transfer.append runs it on its append stream)."""
        self.kv[layer, start:start + kv.shape[0]].copy_(kv, non_blocking=True)

    def rows(self, layer: int) -> torch.Tensor:
        """[max_len*B*Hkv, 2*d] host view: one row = one token's key and value for one kv head."""
        return self.kv[layer].view(-1, 2 * self.shape[-1])

    def gather_source(self, layer: int) -> torch.Tensor:
        """What the gather indexes: the rows' device alias on CUDA, the host rows on CPU."""
        src = self.kv if self.dev is None else self.dev
        return src[layer].view(-1, 2 * self.shape[-1])

    def prefix(self, layer: int, length: int) -> torch.Tensor:
        """Tokens 0..length as [length, B, Hkv, 2, d] (contiguous)."""
        return self.kv[layer, :length]

    def keys_values(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views [B, Hkv, length, d] of a layer's keys and values."""
        p = self.prefix(layer, length)
        return p[..., 0, :].permute(1, 2, 0, 3), p[..., 1, :].permute(1, 2, 0, 3)

    def close(self) -> None:
        self.dev = None
        if self._registered:
            torch.cuda.cudart().cudaHostUnregister(self.kv.data_ptr())
            self._registered = False

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: CUDA may be gone already
            pass


class Slot:
    """One of two rotating buffers for the speculated layers (layer j uses slot j % 2): the
    gathered rows and the attention bias that masks the padded ones, both sized for the largest
    budget so every step reuses them. Two suffice: layer j+2's gather (side stream) starts after
    an event recorded at layer j+1's start, i.e. after layer j's attention read the slot."""

    def __init__(self, rows: int, cap: int, head_dim: int, dtype, device: torch.device):
        self.dev = torch.zeros((rows, 2 * head_dim), dtype=dtype, device=device)  # never NaN, even unfetched
        self.bias = torch.zeros(cap, dtype=torch.float32, device=device)

    @property
    def nbytes(self) -> int:
        return self.dev.numel() * self.dev.element_size()
