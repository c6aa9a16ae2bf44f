"""Sensitivity analysis: which heads, layers, MLP channels and linear layers matter, on calibration text.

Scores (all on the same calibration blocks, losses in nats per token):
- heads: first-order Taylor importance sum|w * dL/dw| over each query head's q rows and o columns
  (and per KV group: its query heads plus its k and v rows), and the loss change when one KV
  group's contribution is masked (with a single KV head, as in Gemma 3 270M: one query head's);
- layers: the loss change when the layer is skipped (its output replaced by its input), and the
  angular distance arccos(cos(x_in, x_out)) / pi between its input and output hidden states;
- mlp: Taylor importance of each MLP channel (its gate/up rows and down column);
- quant: the loss change when only that linear layer is rounded to nearest on the grid quantize will
  use (quantize's own RTN: its bits, group size, zero point and symmetry; a profile's quantize step sets them).

Writes sensitivity.json and heatmaps/*.png; `vcompress prune --scores` ranks by it.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from vcompress.core.artifact import write_json
from vcompress.core.layer_stream import LayerStream, stream_source
from vcompress.core.models import DEFAULT_NAME, attention_shape, head_units
from vcompress.core.profiles import DEFAULT_SCHEME
from vcompress.core.stage import Stage, StageConfig

from ._arch import attention, decoder_layers, final_norm, in_dim, is_gpt2, linear_modules, out_dim, shape, unit_heads
from ._calib import calibration_summary, stage_blocks
from ._gptq_core import Grid, rtn
from ._heads import masked_heads
from ._ranking import least_important_layers
from .prune_plan import analysis_unneeded
from .quantize import Quantize, choose_group_size, quantizable, set_weight, weight_of

PARTS = ("heads", "layers", "mlp", "quant")
SENSITIVITY = "sensitivity.json"
UNITS = {
    "loss": "nats per token (mean next-token cross-entropy on the calibration blocks)",
    "loss_delta": "nats per token, loss with the change minus baseline_loss_nats (higher = more important)",
    "taylor": "sum over the weights of |w * dL/dw|, L the mean loss (higher = more important)",
    "angular_distance": "arccos(cosine(layer input, layer output)) / pi, mean over tokens, 0..1 (lower = the layer changes less)",
}


# --- measuring ------------------------------------------------------------------------


@torch.no_grad()
def mean_loss(model, blocks: torch.Tensor, batch_size: int = 4) -> float:
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, blocks.shape[0], batch_size):
        ids = blocks[start : start + batch_size].to(device)
        total += model(input_ids=ids, labels=ids, use_cache=False).loss.item() * ids.shape[0]
    return total / blocks.shape[0]


class Probe:
    """The calibration loss of a model, re-run from any layer.

    One full forward pass caches every decoder layer's inputs; a change at layer i (a masked group,
    a rounded weight, the layer skipped) then re-runs only layers i.. and the head, which is exact
    because nothing before layer i changed. It also measures each layer's angular distance.
    """

    def __init__(self, model, blocks: torch.Tensor, batch_size: int = 4, resident=contextlib.nullcontext):
        self.model, self.layers, self.resident = model, decoder_layers(model), resident
        device = next(model.parameters()).device
        self.batches: list[tuple[torch.Tensor, list]] = []
        angle_sums = [0.0] * len(self.layers)
        for start in range(0, blocks.shape[0], batch_size):
            ids = blocks[start : start + batch_size].to(device)
            calls: list = [None] * len(self.layers)
            outputs: list = [None] * len(self.layers)

            def keep(index):  # the hooks run inside this iteration's forward, so its lists are the ones they fill
                def pre(module, args, kwargs):
                    calls[index] = (args, kwargs)  # noqa: B023

                def post(module, args, kwargs, output):
                    outputs[index] = _hidden(output)  # noqa: B023

                return pre, post

            handles = []
            for i, layer in enumerate(self.layers):
                before, after = keep(i)
                handles += [layer.register_forward_pre_hook(before, with_kwargs=True), layer.register_forward_hook(after, with_kwargs=True)]
            try:
                with torch.no_grad():
                    self.model(input_ids=ids, use_cache=False)
            finally:
                for handle in handles:
                    handle.remove()
            for i in range(len(self.layers)):
                cos = F.cosine_similarity(_hidden_in(*calls[i]).float(), outputs[i].float(), dim=-1).clamp(-1.0, 1.0)
                angle_sums[i] += (torch.arccos(cos) / math.pi).sum().item()
            self.batches.append((ids, calls))
        self.angular_distance = [s / blocks.numel() for s in angle_sums]
        self.baseline = self.loss()

    def loss_input(self) -> list[torch.Tensor]:
        """The last decoder layer's output per batch (what the final norm and LM head read)."""
        with self.resident(self.layers[-1]):
            return [call_layer(self.layers[-1], _hidden_in(*calls[-1]), *calls[-1]) for _, calls in self.batches]

    @torch.no_grad()
    def loss(self, start: int = 0, skip: int | None = None) -> float:
        """Mean loss running layers start.. (without `skip`) from the cached inputs of layer `start`.
        Layer by layer over all batches, so a streamed model reads each layer once per call."""
        hidden = [_hidden_in(*calls[start]) for _, calls in self.batches]
        for j in range(start, len(self.layers)):
            if j != skip:
                with self.resident(self.layers[j]):
                    hidden = [call_layer(self.layers[j], h, *calls[j]) for h, (_, calls) in zip(hidden, self.batches)]
        total, count = 0.0, 0
        for h, (ids, _) in zip(hidden, self.batches):
            logits = self.model.lm_head(final_norm(self.model)(h)).float()
            total += F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
            count += ids[:, 1:].numel()
        return total / count


def call_layer(layer, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """A decoder layer on new hidden states, with the other arguments of a recorded call."""
    return _hidden(layer(hidden, *args[1:], **kwargs) if args else layer(**{**kwargs, "hidden_states": hidden}))


def _hidden_in(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _saliency(module, dim_kept: int) -> torch.Tensor:
    """sum |w * grad| of a projection, kept along one weight dimension (plus the bias for output features)."""
    weight = module.weight
    scores = (weight.detach() * weight.grad).abs().sum(dim=1 - dim_kept)
    bias = getattr(module, "bias", None)
    if bias is not None and bias.grad is not None and dim_kept == out_dim(module):
        scores = scores + (bias.detach() * bias.grad).abs()
    return scores


def taylor_scores(model, blocks: torch.Tensor, batch_size: int = 4) -> dict:
    """Per query head, per KV group and per MLP channel: sum|w * dL/dw| with L the mean calibration loss."""
    device = next(model.parameters()).device
    inside = {id(p) for p in decoder_layers(model).parameters()}
    frozen = [p for p in model.parameters() if id(p) not in inside and p.requires_grad]
    for p in frozen:  # embeddings and lm_head need no gradient (and tied ones cost a big matmul)
        p.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    try:
        with torch.enable_grad():
            for start in range(0, blocks.shape[0], batch_size):
                ids = blocks[start : start + batch_size].to(device)
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss * (ids.shape[0] / blocks.shape[0])
                loss.backward()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    rows = [layer_taylor(model, layer) for layer in decoder_layers(model)]
    model.zero_grad(set_to_none=True)
    return {key: [row[key] for row in rows] for key in ("query", "groups", "channels")}


def taylor_scores_streamed(model, probe: Probe, stream) -> dict:
    """taylor_scores with one layer in memory at a time: the loss gradient at the last layer's output,
    then back through the layers in reverse, each re-run from its cached input (the same chain rule
    as one backward pass through the whole model)."""
    layers, n = probe.layers, sum(ids.shape[0] for ids, _ in probe.batches)
    with torch.no_grad():
        last = probe.loss_input()
    grads = []
    for out, (ids, _) in zip(last, probe.batches):
        out = out.detach().requires_grad_()
        with torch.enable_grad():
            logits = model.lm_head(final_norm(model)(out)).float()
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()) * (ids.shape[0] / n)
            grads.append(torch.autograd.grad(loss, out)[0])
    rows = []
    for j in reversed(range(len(layers))):
        with stream.resident(layers[j]) as layer, torch.enable_grad():
            layer.zero_grad(set_to_none=True)
            for b, (_, calls) in enumerate(probe.batches):
                x = _hidden_in(*calls[j]).detach().requires_grad_()
                call_layer(layer, x, *calls[j]).backward(grads[b])
                grads[b] = x.grad
            rows.append(layer_taylor(model, layer))
    rows.reverse()
    return {key: [row[key] for row in rows] for key in ("query", "groups", "channels")}


@torch.no_grad()
def layer_taylor(model, layer) -> dict:
    """One layer's Taylor scores from the gradients its weights hold."""
    info = attention_shape(model.config)
    heads, kv, d = info["query_heads"], info["kv_heads"], info["head_dim"]
    attn = attention(layer)
    if is_gpt2(model):
        q, k, v = _saliency(attn.c_attn, out_dim(attn.c_attn)).split(heads * d)
        o = _saliency(attn.c_proj, in_dim(attn.c_proj))
        down = layer.mlp.c_proj
        channel = _saliency(layer.mlp.c_fc, out_dim(layer.mlp.c_fc))
    else:
        q, k, v = (_saliency(m, 0) for m in (attn.q_proj, attn.k_proj, attn.v_proj))
        o = _saliency(attn.o_proj, 1)
        down = layer.mlp.down_proj
        channel = _saliency(layer.mlp.gate_proj, 0) + _saliency(layer.mlp.up_proj, 0)
    per_query = (q + o).view(heads, d).sum(1)
    per_group = (k + v).view(kv, d).sum(1) + per_query.view(kv, heads // kv).sum(1)
    return {"query": per_query.tolist(), "groups": per_group.tolist(), "channels": (channel + _saliency(down, in_dim(down))).tolist()}


@contextlib.contextmanager
def quantized(module, grid: Grid):
    """Inside the block, only this projection's weight is rounded, by quantize's own RTN on `grid`."""
    original = module.weight.data
    set_weight(module, rtn(weight_of(module).float(), grid).dequantize())
    try:
        yield
    finally:
        module.weight.data = original


def model_grid(model, grid: Grid) -> Grid:
    """`grid` with the group size quantize would use for this model (one for every linear, falling back 128 -> 64 -> 32)."""
    return Grid(grid.bits, choose_group_size(grid.group_size, quantizable(model), grid.bits), sym=grid.sym, float_zero=grid.float_zero)


# --- the whole analysis ---------------------------------------------------------------


def analyze(model, blocks: torch.Tensor, *, parts=PARTS, batch_size: int = 4, grid: Grid | None = None, log=print, stream=None) -> dict:
    """All requested scores for `model` on `blocks`, as plain lists (layer-major), rounded to 6 digits.

    With a `stream` (core.layer_stream.LayerStream whose skeleton `model` is), layers are read from disk
    when they run and dropped after; a layer whose weights a probe changes is held for that probe."""
    resident = stream.resident if stream is not None else contextlib.nullcontext
    info = shape(model)
    layers = decoder_layers(model)
    result: dict = {
        "model_type": model.config.model_type,
        "shape": info,
        "config": json.loads(model.config.to_json_string()),  # what `run --auto` predicts each candidate's artifact from
        "units": UNITS,
    }
    started = time.time()
    probe = Probe(model, blocks, batch_size, resident)
    loss = probe.baseline
    result["baseline_loss_nats"] = loss
    log(f"baseline loss {loss:.4f} nats/token on {blocks.shape[0]} x {blocks.shape[1]} tokens")

    if "heads" in parts or "mlp" in parts:
        taylor = taylor_scores(model, blocks, batch_size) if stream is None else taylor_scores_streamed(model, probe, stream)
        log(f"taylor scores ({time.time() - started:.0f}s)")
    if "heads" in parts:
        deltas = []
        for i, layer in enumerate(layers):
            row = []
            with resident(layer):
                for unit in range(head_units(info["query_heads"], info["kv_heads"])):  # KV groups (or one KV head's query heads)
                    with masked_heads(layer, unit_heads(unit, info["query_heads"], info["kv_heads"]), info["head_dim"]):
                        row.append(probe.loss(start=i) - loss)
            deltas.append(row)
        result["heads"] = {"taylor_query": taylor["query"], "taylor_kv_group": taylor["groups"], "mask_loss_delta_nats": deltas}
        log(f"KV group masking ({time.time() - started:.0f}s)")
    if "mlp" in parts:
        result["mlp"] = {"taylor_channel": taylor["channels"]}
    if "layers" in parts:
        skips = [probe.loss(start=i, skip=i) - loss for i in range(len(layers))]
        result["layers"] = {"skip_loss_delta_nats": skips, "angular_distance": probe.angular_distance}
        log(f"layer skipping ({time.time() - started:.0f}s)")
    if "quant" in parts:
        grid = model_grid(model, grid or Analyze.Config().grid)
        names = [name for name, _ in linear_modules(layers[0])]
        rows = []
        for i, layer in enumerate(layers):
            row = []
            with resident(layer):
                for _, module in linear_modules(layer):
                    with quantized(module, grid):
                        row.append(probe.loss(start=i) - loss)
            rows.append(row)
        zero = "symmetric" if grid.sym else ("float zero point" if grid.float_zero else "integer zero point")
        result["quant"] = {
            "scheme": f"quantize's rtn, int{grid.bits}, group {grid.group_size}, {zero}",
            "bits": grid.bits,
            "group_size": grid.group_size,
            "sym": grid.sym,
            "zero_point": "float" if grid.float_zero else "int",
            "modules": names,
            "loss_delta_nats": rows,
        }
        log(f"{grid.bits}-bit rounding per linear layer ({time.time() - started:.0f}s)")
    return _rounded(result)


def _rounded(data):
    if isinstance(data, float):
        return float(f"{data:.6g}")
    if isinstance(data, dict):
        return {k: _rounded(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_rounded(v) for v in data]
    return data


# --- figures --------------------------------------------------------------------------


def write_heatmaps(result: dict, folder: Path) -> list[Path]:
    """heads.png (layers x heads), layers.png (per-layer bars), quant.png (layers x linear layers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    n = result["shape"]["layers"]
    tall = max(4.0, 0.26 * n + 1.8)

    if "heads" in result:
        heads = result["heads"]
        share = torch.tensor(heads["taylor_query"])
        share = share / share.sum(1, keepdim=True).clamp(min=1e-30)
        fig, (a, b) = plt.subplots(
            1, 2, figsize=(11, tall), gridspec_kw={"width_ratios": [max(3, share.shape[1]), max(2, len(heads["mask_loss_delta_nats"][0]))]}
        )
        _heatmap(a, share.tolist(), "query head", "{:.0%}", "Taylor importance per query head\n(share of its layer's total)", fig)
        per = result["shape"]["query_heads"] // result["shape"]["kv_heads"]
        for edge in range(per, result["shape"]["query_heads"], per):
            a.axvline(edge - 0.5, color="white", lw=2)
        _heatmap(
            b, heads["mask_loss_delta_nats"], "KV group", "{:.3f}", "loss change when the KV group\nis masked (nats/token)", fig, delta=True
        )
        fig.suptitle(
            f"Attention heads: {result['shape']['query_heads']} query / {result['shape']['kv_heads']} KV heads per layer (white lines: KV groups)"
        )
        written.append(_save(fig, folder / "heads.png", plt))

    if "layers" in result:
        layers = result["layers"]
        fig, (a, b) = plt.subplots(2, 1, figsize=(max(7.0, 0.3 * n + 2), 7), sharex=True)
        order = least_important_layers(result)
        colors = ["tab:red" if i in order[: max(1, n // 6)] else "tab:blue" for i in range(n)]
        a.bar(range(n), layers["skip_loss_delta_nats"], color=colors)
        a.set_yscale("symlog", linthresh=0.01)
        a.set_ylabel("loss change (nats/token, log)")
        for i, value in enumerate(layers["skip_loss_delta_nats"]):
            a.text(i, value, f"{value:.2f}", ha="center", va="bottom", fontsize=6)
        a.set_title(f"Loss change when the layer is skipped (red: the {max(1, n // 6)} least important)")
        b.bar(range(n), layers["angular_distance"], color="tab:gray")
        b.set_ylabel("angular distance (0..1)")
        b.set_title("Angular distance between the layer's input and output hidden states")
        b.set_xlabel("layer")
        b.set_xticks(range(n))
        for ax in (a, b):
            ax.grid(axis="y", alpha=0.3)
        written.append(_save(fig, folder / "layers.png", plt))

    if "quant" in result:
        quant = result["quant"]
        fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(quant["modules"]) + 2), tall))
        _heatmap(
            ax,
            quant["loss_delta_nats"],
            None,
            "{:.4f}",
            f"Loss change (nats/token) when only this layer is rounded to {quant['bits']}-bit RTN, group {quant['group_size']}\n(red: the loss rises; blue: it falls, which is measurement noise)",
            fig,
            delta=True,
        )
        ax.set_xticks(range(len(quant["modules"])), quant["modules"], rotation=30, ha="right", fontsize=8)
        written.append(_save(fig, folder / "quant.png", plt))
    return written


def _heatmap(ax, values, xlabel, fmt, title, fig, *, delta: bool = False):
    """Annotated heatmap; loss deltas get a diverging, symmetric-log scale so a few large values
    do not wash out the rest (red: the loss rises, blue: it falls)."""
    from matplotlib.colors import SymLogNorm

    data = torch.tensor(values, dtype=torch.float32)
    if delta:
        top = max(data.abs().max().item(), 2e-3)
        norm = SymLogNorm(linthresh=1e-3, vmin=-top, vmax=top)
        image = ax.imshow(data.numpy(), aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
    else:
        image = ax.imshow(data.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    rows, cols = data.shape
    ax.set_yticks(range(rows))
    ax.set_yticklabels(range(rows), fontsize=7)
    ax.set_ylabel("layer")
    if xlabel:
        ax.set_xticks(range(cols))
        ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    if rows <= 48 and cols <= 16:
        for i in range(rows):
            for j in range(cols):
                value = data[i, j].item()
                red, green, blue, _ = image.cmap(image.norm(value))
                dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
                ax.text(j, i, fmt.format(value), ha="center", va="center", fontsize=6, color="white" if dark else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- the stage ------------------------------------------------------------------------


class Analyze(Stage):
    name = "analyze"
    folder = "01-analyze"
    produces = "analysis"

    class Config(StageConfig):
        samples: int = Field(4, gt=0, description="calibration blocks (4 x 128 tokens: about 4 minutes for the 135M default on 2 cores)")
        seq_len: int = Field(128, ge=8, description="tokens per calibration block")
        batch_size: int = Field(4, gt=0, description="calibration blocks per forward pass")
        parts: list[Literal["heads", "layers", "mlp", "quant"]] = Field(list(PARTS), description="what to score (repeat the option)")
        # the grid of the quant part: quantize's settings, which a profile's quantize step fills in
        bits: Literal[2, 4, 8] = Field(DEFAULT_SCHEME.bits, description="quant part: bits per weight of the grid")
        group_size: int = Field(
            DEFAULT_SCHEME.group_size, gt=0, description="quant part: weights per scale; falls back to 64 or 32 as quantize's does"
        )
        sym: bool = Field(DEFAULT_SCHEME.sym, description="quant part: symmetric grid")
        zero_point: Literal["int", "float"] = Field(
            DEFAULT_SCHEME.zero_point, description="quant part: zero point as an integer or a float"
        )
        stream: Literal["auto", "on", "off"] = Field(
            "auto", description="read one decoder layer at a time from disk (auto: when the model would not fit in memory)"
        )

        @model_validator(mode="after")
        def _consistent(self):
            if self.zero_point == "float" and self.sym:
                raise ValueError("a symmetric grid has no zero point to store as a float; drop sym or zero_point")
            return self

        @property
        def grid(self) -> Grid:
            return Grid(self.bits, self.group_size, sym=self.sym, float_zero=self.zero_point == "float")

    @classmethod
    def from_profile(cls, settings: dict, profile, where=None) -> Analyze:
        """Rank the linears on the grid the profile's quantize step will use (its bits, group size, zero point)."""
        step = profile.step("quantize")
        if step is None:
            return super().from_profile(settings, profile, where)
        q = Quantize.from_profile(step.settings, profile, where).config
        grid = {"bits": q.grid_bits, "group_size": q.group_size, "sym": q.sym, "zero_point": q.zero_point}
        return cls(cls.parse_config({**grid, **settings}, where))

    def run(self, ctx) -> dict:
        cfg = self.config
        folder, stream = stream_source(cfg.stream, ctx), None
        if folder is not None:
            stream = LayerStream(folder)
            model, tokenizer = stream.model, ctx.load_tokenizer()
            stream.load_outside(decoder_layers(model))
            stream.on_demand(decoder_layers(model))
            ctx.log(f"streaming {folder} layer by layer (the decoder layers are never all in memory)")
        else:
            model, tokenizer = ctx.load()
        if skipped := analysis_unneeded(model.config.to_dict(), ctx.profile):
            ctx.log(f"skipped: {skipped}")
            write_json(ctx.out / SENSITIVITY, {"model": str(ctx.source) if ctx.source else DEFAULT_NAME, "skipped": skipped})
            return {"streamed": stream is not None, "skipped": skipped, "heatmaps": []}
        blocks = stage_blocks(tokenizer, ctx, samples=cfg.samples, seq_len=cfg.seq_len)
        result = {"model": str(ctx.source) if ctx.source else DEFAULT_NAME}
        result.update(analyze(model, blocks, parts=cfg.parts, batch_size=cfg.batch_size, grid=cfg.grid, log=ctx.log, stream=stream))
        result["calibration"] = {**calibration_summary(blocks, ctx), "seed": ctx.seed}
        write_json(ctx.out / SENSITIVITY, result)
        figures = write_heatmaps(result, ctx.out / "heatmaps")
        metrics = {
            "streamed": stream is not None,
            "baseline_loss_nats": result["baseline_loss_nats"],
            "calibration_tokens": blocks.numel(),
            "heatmaps": [str(p.relative_to(ctx.out)) for p in figures],
        }
        if "layers" in result:
            metrics["least_important_layers"] = least_important_layers(result)[:5]
        if "quant" in result:
            flat = [
                (delta, i, name)
                for i, row in enumerate(result["quant"]["loss_delta_nats"])
                for name, delta in zip(result["quant"]["modules"], row)
            ]
            delta, i, name = max(flat)
            metrics["most_quant_sensitive"] = {"layer": i, "module": name, "loss_delta_nats": delta}
        return metrics
