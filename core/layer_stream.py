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

    def __init__(self, folder: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.folder = Path(folder)
        self.dtype, self.device = dtype, device
        self.files = tensor_files(self.folder)
        config = AutoConfig.from_pretrained(self.folder)
        if hasattr(config, "quantization_config"):
            raise InputError(f"{self.folder} is already quantized; stream its float source instead, or pass --stream off")
        with init_empty_weights():
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.model.eval()
        self._names = {id(m): name for name, m in self.model.named_modules()}
        self._held: dict[int, int] = {}

    def read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.files:
            raise InputError(f"{self.folder} has no tensor {name!r}, which its config.json needs; re-export the checkpoint")
        with safe_open(str(self.files[name]), framework="pt") as f:
            return f.get_tensor(name).to(self.dtype)

    def load(self, module: torch.nn.Module) -> torch.nn.Module:
        from accelerate.utils import set_module_tensor_to_device

        prefix = self._names[id(module)]
        for name, _ in list(module.named_parameters(recurse=True)):
            full = f"{prefix}.{name}" if prefix else name
            set_module_tensor_to_device(self.model, full, self.device, value=self.read(full))
        return module

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
                while size:
                    chunk = self._scratch.read(min(size, 64 << 20))
                    out.write(chunk)
                    size -= len(chunk)
        self._scratch.close()
        self._scratch_path.unlink()
        os.replace(tmp, self.path)

    def abort(self) -> None:
        self._scratch.close()
        self._scratch_path.unlink(missing_ok=True)


def stream_source(setting: str, ctx) -> Path | None:
    """The safetensors folder a stage should stream its source from ("on", or "auto" when the model
    would not fit in memory), or None to load it whole. A GGUF is converted once into the cache."""
    from .models import converted_gguf_dir

    if setting == "off":
        return None
    source = ctx.intake.resolve(ctx.source)
    if source.kind == "gguf":
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


def available_memory() -> int:
    """Bytes the kernel could give now without swapping (MemAvailable: free memory plus reclaimable cache)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def return_freed_memory() -> None:
    """Hand the heap's freed memory back to the OS. glibc keeps it otherwise, and a streamed run then holds
    every layer's freed temporaries as if they were live (measured on Qwen2.5-0.5B: 1,372 MiB resident after
    three GPTQ layers without this, 830 MiB with it)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to ask
        pass
