"""Reading single tensors of a safetensors file with plain reads, never a memory map.

`safetensors.safe_open` maps the whole file: every page a read touches stays in the process's resident set
until the file is closed, so reading a model layer by layer through one handle ends up with the whole file
resident. Here each tensor is read with `readinto` straight into the tensor that keeps it (or a fresh one), so
only what the caller keeps is in memory; the kernel's page cache (not counted against the process) does the rest.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from ground_node.errors import GroundError

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 << 20


class TensorFile:
    """A safetensors file opened for reading tensor by tensor (`with TensorFile(path) as f: f.read(name)`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._fh = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
        except OSError as exc:
            raise GroundError(f"cannot open {self.path}: {exc}") from exc
        try:
            self._header, self._data_start = self._read_header()
        except BaseException:
            self._fh.close()
            raise

    def _read_header(self) -> tuple[dict[str, Any], int]:
        head = self._fh.read(8)
        if len(head) != 8:
            raise GroundError(f"{self.path}: not a safetensors file (shorter than its header length)")
        (length,) = struct.unpack("<Q", head)
        if length > _MAX_HEADER:
            raise GroundError(f"{self.path}: implausible safetensors header of {length} bytes")
        try:
            header: dict[str, Any] = json.loads(self._fh.read(length))
        except ValueError as exc:
            raise GroundError(f"{self.path}: unreadable safetensors header: {exc}") from exc
        header.pop("__metadata__", None)
        return header, 8 + length

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._fh.close()

    def keys(self) -> list[str]:
        return list(self._header)

    def __contains__(self, name: object) -> bool:
        return name in self._header

    def _info(self, name: str) -> dict[str, Any]:
        info = self._header.get(name)
        if info is None:
            raise GroundError(f"{self.path}: no tensor {name}")
        return dict(info)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(s) for s in self._info(name)["shape"])

    def dtype(self, name: str) -> torch.dtype:
        code = self._info(name)["dtype"]
        if code not in _DTYPES:
            raise GroundError(f"{self.path}: tensor {name} has unsupported dtype {code}")
        return _DTYPES[code]

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor `name`, read into `out` when given (same shape; cast if its dtype differs), else a new one."""
        shape, dtype = self.shape(name), self.dtype(name)
        if out is not None and tuple(out.shape) != shape:
            raise GroundError(f"{self.path}: {name} has shape {list(shape)}, expected {list(out.shape)}")
        direct = out is not None and out.dtype == dtype and out.is_contiguous() and out.device.type == "cpu"
        target = out if direct and out is not None else torch.empty(shape, dtype=dtype)
        begin, end = (int(x) for x in self._info(name)["data_offsets"])
        if end - begin != target.numel() * target.element_size():
            raise GroundError(f"{self.path}: {name}: {end - begin} bytes do not fit shape {list(shape)} {dtype}")
        self._read_into(target, self._data_start + begin, end - begin)
        if out is not None and not direct:
            with torch.no_grad():
                out.copy_(target)
            return out
        return target

    def _read_into(self, target: torch.Tensor, offset: int, size: int) -> None:
        if size == 0:
            return
        array: Any = target.detach().reshape(-1).view(torch.uint8).numpy()
        view = memoryview(array).cast("B")
        self._fh.seek(offset)
        done = 0
        while done < size:
            got = self._fh.readinto(view[done:])
            if not got:
                raise GroundError(f"{self.path}: file ends inside a tensor (truncated?)")
            done += got
