"""A checkpoint one layer at a time: its skeleton on the meta device, weights read from disk on demand.

A stage that works layer by layer (GPTQ, RTN) then holds the largest layer plus its activations in
memory, not the model. accelerate builds the skeleton (`init_empty_weights`) and puts tensors in
place (`set_module_tensor_to_device`); safetensors' lazy reader (`safe_open`) reads one tensor at
a time. `TensorFileWriter` is the other end: a .safetensors file written tensor by tensor, because
safetensors' own writer needs every tensor in memory at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from .errors import InputError

DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class LayerStream:
    """`model` is the checkpoint's skeleton (parameters on the meta device, buffers real);
    `load(module)` reads that module's tensors from the folder, `release(module)` drops them."""

    reads_quantized = False  # a folder whose config names a quantization_config (DequantizedStream reads one)

    def __init__(self, folder: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        from transformers import AutoConfig

        self.folder = Path(folder)
        self.dtype, self.device = dtype, device
        self.files = tensor_files(self.folder)
        free_large_blocks_at_once()
        config = AutoConfig.from_pretrained(self.folder)
        if hasattr(config, "quantization_config") and not self.reads_quantized:
            raise InputError(f"{self.folder} is already quantized; stream its float source instead, or pass --stream off")
        self.model = meta_model(config, dtype)
        self._names = {id(m): name for name, m in self.model.named_modules()}
        self._held: dict[int, int] = {}

    def read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.files:
            raise InputError(f"{self.folder} has no tensor {name!r}, which its config.json needs; re-export the checkpoint")
        with safe_open(str(self.files[name]), framework="pt") as f:
            return f.get_tensor(name).to(self.dtype)

    def rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """table[ids] for a stored [rows, dim] table (an embedding), reading only the rows asked for:
        the first layer's inputs then need the calibration tokens' embeddings, not the whole table."""
        from safetensors import safe_open

        unique, where = torch.unique(ids, return_inverse=True)
        with safe_open(str(self.files[name]), framework="pt") as f:
            table = f.get_slice(name)
            picked = torch.cat([table[i : i + 1] for i in unique.tolist()]).to(self.dtype)
        return picked[where]

    def copy_into(self, writer: TensorFileWriter, name: str) -> None:
        """Write a stored tensor to `writer` at this stream's dtype; a tensor already at it is copied byte
        for byte in chunks, never whole in memory (a 0.5B model's embedding is 545 MB in fp32)."""
        header, data_start = _header(self.files[name])
        entry = header[name]
        if entry["dtype"] != DTYPES[self.dtype]:
            writer.add(name, self.read(name))
            return
        start, end = entry["data_offsets"]
        writer.add_bytes(name, self.dtype, entry["shape"], self.files[name], data_start + start, end - start)

    def load(self, module: torch.nn.Module) -> torch.nn.Module:
        from accelerate.utils import set_module_tensor_to_device

        prefix = self._names[id(module)]
        for name, _ in list(module.named_parameters(recurse=True)):
            full = f"{prefix}.{name}" if prefix else name
            set_module_tensor_to_device(self.model, full, self.device, value=self.read(full))
        return module

    def name_of(self, module: torch.nn.Module) -> str:
        return self._names[id(module)]

    def release(self, module: torch.nn.Module) -> None:
        module.to("meta")
        return_freed_memory()

    def load_outside(self, layers: torch.nn.ModuleList) -> None:
        """Read every tensor outside the decoder layers (embeddings, final norm, LM head) and keep it."""
        from accelerate.utils import set_module_tensor_to_device

        inside = {id(p) for p in layers.parameters()}
        tied = getattr(self.model.config, "tie_word_embeddings", False)
        head = self.model.get_output_embeddings()
        for name, param in list(self.model.named_parameters()):
            if id(param) not in inside and not (tied and head is not None and param is head.weight):
                set_module_tensor_to_device(self.model, name, self.device, value=self.read(name))
        if tied:
            self.model.tie_weights()

    def on_demand(self, layers: torch.nn.ModuleList) -> None:
        """Each layer is read before its forward and dropped after it, unless held `resident`."""

        def before(module, args) -> None:
            if not self._held.get(id(module)):
                self.load(module)

        def after(module, args, out) -> None:
            if not self._held.get(id(module)):
                self.release(module)

        for layer in layers:
            layer.register_forward_pre_hook(before)
            layer.register_forward_hook(after)

    @contextlib.contextmanager
    def resident(self, module: torch.nn.Module):
        """Inside the block the module stays in memory (read once), so its weights can be changed and reused."""
        held = self._held.get(id(module), 0)
        if not held:
            self.load(module)
        self._held[id(module)] = held + 1
        try:
            yield module
        finally:
            self._held[id(module)] -= 1
            if not self._held[id(module)]:
                self.release(module)

    def source_bytes(self) -> int:
        return checkpoint_bytes(self.folder, self.dtype)


def checkpoint_bytes(folder: Path, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of a checkpoint's tensors at `dtype` (tied tensors are stored once), read from the file headers."""
    from safetensors import safe_open

    total, size = 0, torch.empty((), dtype=dtype).element_size()
    for file in sorted(set(tensor_files(folder).values())):
        with safe_open(str(file), framework="pt") as f:
            total += sum(torch.Size(f.get_slice(key).get_shape()).numel() * size for key in f.keys())
    return total


def tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the .safetensors file that holds it (sharded checkpoints through their index)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({key: file for key in f.keys()})
    if not out:
        raise InputError(f"{folder} holds no .safetensors weights to stream; pass a Hugging Face folder or --stream off")
    return out


class TensorFileWriter:
    """A .safetensors file written one tensor at a time: data goes to a scratch file as it comes,
    `close()` writes the header and the data (widest dtypes first, so every tensor stays aligned)
    and renames the result into place."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._scratch_path = self.path.with_name(self.path.name + ".data")
        self._scratch = open(self._scratch_path, "w+b")
        self._entries: dict[str, tuple[torch.dtype, list[int], int, int]] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._entries:
            raise ValueError(f"tensor {name} written twice")
        t = tensor.detach().to("cpu").contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        start = self._scratch.tell()
        self._scratch.write(memoryview(data))
        self._entries[name] = (t.dtype, list(t.shape), start, self._scratch.tell() - start)

    def add_bytes(self, name: str, dtype: torch.dtype, shape: list[int], source: Path, offset: int, size: int) -> None:
        """A tensor whose raw bytes lie in `source` at `offset`, copied through a small buffer."""
        if name in self._entries:
            raise ValueError(f"tensor {name} written twice")
        start = self._scratch.tell()
        with open(source, "rb") as f:
            f.seek(offset)
            _copy(f, self._scratch, size)
        self._entries[name] = (dtype, list(shape), start, size)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    @property
    def nbytes(self) -> int:
        return sum(e[3] for e in self._entries.values())

    def close(self, metadata: dict[str, str] | None = None) -> None:
        order = sorted(self._entries, key=lambda n: (-torch.empty((), dtype=self._entries[n][0]).element_size(), n))
        header, offset = {}, 0
        for name in order:
            dtype, shape, _, size = self._entries[name]
            header[name] = {"dtype": DTYPES[dtype], "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
        if metadata:
            header = {"__metadata__": metadata, **header}
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as out:
            out.write(len(text).to_bytes(8, "little"))
            out.write(text)
            for name in order:
                _, _, start, size = self._entries[name]
                self._scratch.seek(start)
                _copy(self._scratch, out, size)
        self._scratch.close()
        self._scratch_path.unlink()
        os.replace(tmp, self.path)

    def abort(self) -> None:
        self._scratch.close()
        self._scratch_path.unlink(missing_ok=True)


def _copy(source, target, size: int, chunk: int = 64 << 20) -> None:
    while size:
        data = source.read(min(size, chunk))
        if not data:
            raise InputError(f"{source.name} ends early; the checkpoint is truncated, re-export it")
        target.write(data)
        size -= len(data)


def _header(file: Path) -> tuple[dict, int]:
    """A .safetensors file's JSON header (name -> dtype, shape, data_offsets from the data start) and
    where its data starts."""
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(size)), 8 + size


def stream_source(setting: str, ctx) -> Path | None:
    """The safetensors folder a stage should stream its source from ("on", or "auto" when the model
    would not fit in memory), or None to load it whole. A GGUF is converted once into the cache."""
    from .models import converted_gguf_dir

    if setting == "off":
        return None
    source = ctx.read_source()
    if source.gguf_file:
        folder = converted_gguf_dir(Path(source.path), log=ctx.log)
    elif source.kind == "hf":
        folder = Path(source.path)
    elif setting == "on":
        raise InputError(
            f"--stream on needs a Hugging Face folder or a GGUF file, not a {source.kind} source; merge it first or pass --stream off"
        )
    else:
        return None
    if setting == "auto" and not too_big_for_memory(checkpoint_bytes(folder)):
        return None
    return folder


def too_big_for_memory(model_bytes: int) -> bool:
    """Stream when the fp32 model would take more than a third of the memory available now (a stage
    holds it about three times over: model, reference outputs, the copy it saves)."""
    return model_bytes > available_memory() / 3


def total_memory() -> int:
    """Bytes of physical memory of this machine (MemTotal)."""
    return _meminfo("MemTotal:") or os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def available_memory() -> int:
    """Bytes the kernel could give now without swapping (MemAvailable: free memory plus reclaimable cache)."""
    return _meminfo("MemAvailable:") or os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _meminfo(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def free_large_blocks_at_once(threshold: int = 4 << 20) -> None:
    """Large allocations get their own mapping, unmapped when freed. glibc otherwise raises its mmap threshold
    up to 32 MB as tensors come and go, and a streamed stage's per-layer temporaries (tens of MB each) then
    fragment the heap: the peak grew layer after layer on Qwen2.5-0.5B until this was set."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # M_MMAP_THRESHOLD; also stops its dynamic adjustment
    except (OSError, AttributeError):
        pass


def return_freed_memory() -> None:
    """Hand the heap's freed memory back to the OS. glibc keeps it otherwise, and a streamed run then holds
    every layer's freed temporaries as if they were live (measured on Qwen2.5-0.5B: 1,372 MiB resident after
    three GPTQ layers without this, 830 MiB with it)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to ask
        pass


# --- reading tensors one at a time: what a streamed export builds its graph from ------------------


class LazyTensors(Mapping):
    """Tensor name -> tensor, read from disk when asked and not kept: a state dict's interface over a
    checkpoint that is never whole in memory (each `[name]` is one read)."""

    def __init__(self, names, read):
        self._names, self._read = dict.fromkeys(names), read

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._read(name)

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def file_tensors(file: str | Path) -> LazyTensors:
    """The tensors of one .safetensors file, as stored (no dtype change), each read by safetensors' lazy reader."""
    from safetensors import safe_open

    def read(name: str) -> torch.Tensor:
        with safe_open(str(file), framework="pt") as f:
            return f.get_tensor(name)

    with safe_open(str(file), framework="pt") as f:
        return LazyTensors(list(f.keys()), read)


def stream_tensors(stream: LayerStream) -> LazyTensors:
    """Every tensor a stream's model holds, by name, at its dtype (a quantized linear's weight dequantized)."""
    dequantized = stream.dequantized if isinstance(stream, DequantizedStream) else {}
    return LazyTensors([*stream.files, *dequantized], stream.read)


def meta_model(config, dtype: torch.dtype = torch.float32):
    """The model a config describes, its parameters on the meta device (accelerate), with no quantization config."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def model_bytes(folder: str | Path, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the model a folder's config describes at `dtype` (tied parameters once), whatever the files
    hold (a quantize folder's codes are smaller than the model it loads as)."""
    from transformers import AutoConfig

    model = meta_model(AutoConfig.from_pretrained(folder), dtype)
    return sum(p.numel() for p in model.parameters()) * torch.empty((), dtype=dtype).element_size()


class DequantizedStream(LayerStream):
    """A quantize-stage folder (quant_manifest.json) streamed as the float model it computes: a quantized
    linear's weight is dequantized from its codes (quant_format.dequantize, as load_dequantized does for
    the whole model) when its layer is read, one linear's codes at a time. LayerStream refuses such a
    folder (its config may name a quantization_config); this one builds the skeleton without it."""

    reads_quantized = True

    def __init__(self, folder: str | Path, manifest: dict, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        super().__init__(folder, dtype, device)
        self.codes = file_tensors(self.folder / manifest["weights_file"])
        self.dequantized = {f"{name}.weight": spec for name, spec in manifest["linears"].items()}

    def read(self, name: str) -> torch.Tensor:
        from .quant_format import dequantize, linear_tensors

        spec = self.dequantized.get(name)
        if spec is None:
            return super().read(name)
        w = dequantize(linear_tensors(self.codes, spec), spec["bits"])  # [in, out]
        return (w if spec.get("module") == "Conv1D" else w.t().contiguous()).to(self.dtype)
