"""The course's interactive widgets (ipywidgets + matplotlib): the RoPE explorer (chapter
02), the attention explorer and the KV-cache calculator (chapter 03), cache growth (05).

Each is a function returning a widget that works in any notebook. The box it returns keeps
its controls in `.controls` (drive them from code: `w.controls["head"].value = 3`), its
latest numbers in `.result` and its figure in `.figure`, so code and tests can read what
it shows. Figures are drawn off-screen (matplotlib's Agg canvas) into an image widget, so
they update in place instead of piling up in the notebook."""
from __future__ import annotations

import io
import math

import numpy as np
import torch

try:  # the course extra: the package itself runs without them
    import ipywidgets as widgets
    from matplotlib.figure import Figure
except ImportError as error:
    raise ImportError(f"llama3_mini.widgets needs {error.name}, part of the course extra: "
                      "pip install 'llama3-mini[course]'") from error

from .config import GiB, get_preset, kv_cache_bytes, weight_bytes
from .model import attention, evaluating, model_device, repeat_kv
from .rope import apply_rotary_emb, apply_scaling, rope_frequencies


class Explorer(widgets.VBox):
    """A VBox that keeps its controls, latest numbers (`result`) and figure, and redraws
    whenever a control's value changes."""

    def __init__(self, title: str, controls: dict, update, extra=()):
        self.controls, self.result, self.figure = controls, {}, None
        self._title, self._update, self._busy = title, update, False
        self.readout = widgets.HTML()
        self.image = widgets.Image(format="png")
        self.image.add_class("l3m-figure")
        self.readout.add_class("l3m-readout")
        boxes = [c for k, c in controls.items() if k != "text"]
        rows = [controls["text"]] if "text" in controls else []
        rows += [widgets.HBox(boxes[i: i + 3]) for i in range(0, len(boxes), 3)]
        super().__init__([*rows, *extra, self.readout, self.image])
        self.add_class("l3m-" + title.lower().replace(" ", "-"))
        for key, control in controls.items():
            control.add_class(f"l3m-control-{key}")  # for the browser tests' selectors
            control.observe(lambda _change: self.refresh(), names="value")
        self.refresh()

    def refresh(self) -> None:
        if self._busy:  # a control changed by the update itself: one redraw is enough
            return
        self._busy = True
        try:
            self._update(self)
        finally:
            self._busy = False

    def set(self, **values) -> "Explorer":
        """Set several controls at once and redraw once: `w.set(layer=1, head=3)`."""
        self._busy = True
        try:
            for name, value in values.items():
                self.controls[name].value = value
        finally:
            self._busy = False
        self.refresh()
        return self

    def show(self, fig: Figure, readout: str) -> None:
        """Put a finished figure and the readout line on screen."""
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        self.figure, self.image.value, self.readout.value = fig, buf.getvalue(), readout

    def __repr__(self) -> str:  # short and stable: it is the notebook's text/plain output
        values = ", ".join(f"{k}={c.value!r}" for k, c in self.controls.items() if k != "text")
        return f"{self._title}({values})"


def _figure(width: float, height: float, ncols: int = 1):
    fig = Figure(figsize=(width, height), dpi=72, layout="constrained")
    return fig, fig.subplots(1, ncols)


# ---------------------------------------------------------------- chapter 02: RoPE explorer
THETAS = [("10,000 (Llama 2)", 10000.0), ("100,000", 100000.0), ("500,000 (Llama 3)", 500000.0),
          ("1,000,000", 1000000.0)]


def rope_explorer(head_dim: int = 128, theta: float = 500000.0, position: int = 100,
                  pair: int = 16, scaled: bool = False, max_distance: int = 131072) -> Explorer:
    """Rotary embeddings, one dimension pair at a time.

    Left: pair `pair` of a query as a 2-D vector, at position 0 and turned to `position`.
    Right: the dot product of a query at position m and a key at m + distance, against the
    distance (q = k = all ones, divided by head_dim so it starts at 1): it depends on the
    distance alone, and falls off as the distance grows. `scaled` applies Llama 3.1's
    frequency scaling (factor 8, original context 8192)."""
    if head_dim % 2:
        raise ValueError(f"head_dim ({head_dim}) must be even: RoPE rotates pairs of dimensions")
    if not 0 <= pair < head_dim // 2:
        raise ValueError(f"pair ({pair}) must be between 0 and {head_dim // 2 - 1} "
                         "(head_dim // 2 - 1)")
    if theta not in dict((v, k) for k, v in THETAS):
        raise ValueError(f"theta ({theta}) must be one of {[v for _, v in THETAS]}")
    style = {"description_width": "initial"}
    controls = {
        "theta": widgets.Dropdown(options=THETAS, value=theta, description="theta", style=style),
        "position": widgets.IntSlider(value=position, min=0, max=max_distance,
                                      description="position m", style=style),
        "pair": widgets.IntSlider(value=pair, min=0, max=head_dim // 2 - 1,
                                  description="pair i", style=style),
        "scaled": widgets.Checkbox(value=scaled, description="Llama 3.1 scaling"),
    }
    distances = torch.unique(torch.logspace(0, math.log10(max_distance), 600).round().long())

    def update(w: Explorer) -> None:
        c = {k: v.value for k, v in w.controls.items()}
        freqs = rope_frequencies(head_dim, c["theta"]).double()  # (head_dim // 2,)
        if c["scaled"]:
            freqs = apply_scaling(freqs)
        freq = freqs[c["pair"]].item()
        angle = (c["position"] * freq) % (2 * math.pi)
        # <R(m) q, R(m + d) k> with q = k = ones: every pair adds 2 cos(d * freq_i)
        dots = 2 * torch.cos(distances[:, None].double() * freqs).sum(-1) / head_dim
        w.result = {"freqs": freqs, "freq": freq, "wavelength": 2 * math.pi / freq,
                    "angle": angle, "distances": distances, "dots": dots}
        fig, (ax0, ax1) = _figure(10, 4, 2)
        t = np.linspace(0, 2 * np.pi, 200)
        ax0.plot(np.cos(t), np.sin(t), color="0.85")
        ax0.annotate("", (1, 0), (0, 0), arrowprops={"arrowstyle": "->", "color": "0.5"})
        ax0.annotate("", (math.cos(angle), math.sin(angle)), (0, 0),
                     arrowprops={"arrowstyle": "->", "color": "C3", "lw": 2})
        ax0.plot([], [], color="0.5", label="position 0")
        ax0.plot([], [], color="C3", label=f"position {c['position']}")
        ax0.set(xlim=(-1.3, 1.3), ylim=(-1.3, 1.3), aspect="equal",
                xlabel=f"dimension {2 * c['pair']}", ylabel=f"dimension {2 * c['pair'] + 1}",
                title=f"pair {c['pair']}: turned {math.degrees(angle):.1f}°")
        ax0.legend(loc="lower left", fontsize=8)
        x = distances.numpy()
        ax1.semilogx(x, dots.numpy(), label="all pairs (q·k / head_dim)")
        ax1.semilogx(x, np.cos(x * freq), alpha=0.5,
                     label=f"pair {c['pair']} alone (cos)")
        ax1.axhline(0, color="0.7", lw=0.8)
        ax1.set(xlabel="relative distance n - m (tokens, log scale)", ylabel="dot product",
                title=f"q at m, k at n; theta {c['theta']:,.0f}"
                + (", scaled" if c["scaled"] else ""))
        ax1.legend(fontsize=8)
        w.show(fig, f"pair {c['pair']}: frequency {freq:.4g} rad/token, wavelength "
                    f"{2 * math.pi / freq:,.1f} tokens; at position {c['position']} "
                    f"it has turned {math.degrees(angle):.1f}°")

    return Explorer("RoPE explorer", controls, update)


# ---------------------------------------------------------- chapter 03: attention explorer
@torch.no_grad()
def attention_weights(model, tokens: torch.Tensor, device=None) -> torch.Tensor:
    """Every layer's attention weights for one sequence: tokens (seq,) ->
    (n_layers, n_heads, seq, seq), float32 on the CPU. A forward hook on each `Attention`
    recomputes them from the layer's inputs along the explicit path, so the model runs
    unchanged (fused or not), on its own device (`device`, if given, must be it), in eval
    mode, and is left as it was found."""
    device = model_device(model, device)
    kept: list[torch.Tensor] = []

    def keep(attn, inputs, _output):  # inputs: Attention.forward's (x, freqs_cis, mask, ...)
        x, freqs_cis, mask = inputs[:3]
        bsz, seqlen, _ = x.shape
        xq = attn.wq(x).view(bsz, seqlen, attn.n_heads, attn.head_dim)
        xk = attn.wk(x).view(bsz, seqlen, attn.n_kv_heads, attn.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis)
        keys = repeat_kv(xk, attn.n_rep).transpose(1, 2)  # (bsz, n_heads, seq, head_dim)
        kept.append(attention(xq.transpose(1, 2), keys, keys, mask)[1])  # values unused

    hooks = [layer.attention.register_forward_hook(keep) for layer in model.layers]
    try:
        with evaluating(model):
            model(tokens.to(device)[None])  # (1, seq) -> logits, unused
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack([w[0] for w in kept]).float().cpu()  # w: (1, n_heads, seq, seq)


def token_labels(tokenizer, ids) -> list[str]:
    """One printable label per token: spaces shown as '·', newlines as '\\n'."""
    decode_bytes = getattr(tokenizer, "decode_bytes", None)
    pieces = [decode_bytes([i]).decode("utf-8", errors="replace") if decode_bytes
              else tokenizer.decode([i]) for i in ids]
    return [p.replace(" ", "·").replace("\n", "\\n") for p in pieces]


def attention_explorer(model, tokenizer, text: str, layer: int = 0, head: int = 0,
                       query: int | None = None, max_tokens: int = 48,
                       device=None) -> Explorer:
    """Attention weights of any `Transformer` on a text of your own.

    Type a text, pick a layer and a head: the heatmap shows every query token (rows)
    against every key token (columns). Pick a query token to see where it looks: its row is
    outlined and drawn as bars on the right. `tokenizer` needs `encode(text)` and
    `decode(ids)` (or `decode_bytes(ids)`); texts are cut to `max_tokens` tokens. Runs on
    the model's device (`device`, if given, must be the model's)."""
    device = model_device(model, device)
    n_layers, n_heads = len(model.layers), model.params.n_heads
    for name, value, limit in (("layer", layer, n_layers), ("head", head, n_heads)):
        if not 0 <= value < limit:
            raise ValueError(f"{name} ({value}) must be between 0 and {limit - 1}")
    controls = {
        "text": widgets.Text(value=text, description="text", continuous_update=False,
                             layout=widgets.Layout(width="95%")),
        "layer": widgets.Dropdown(options=list(range(n_layers)), value=layer,
                                  description="layer"),
        "head": widgets.Dropdown(options=list(range(n_heads)), value=head, description="head"),
        "query": widgets.Dropdown(description="query token"),
    }
    cache = {"query": query}

    def encode(text: str):
        if cache.get("text") != text:
            ids = list(tokenizer.encode(text))[: min(max_tokens, model.params.max_seq_len)]
            if not ids:
                raise ValueError("the text gives no tokens: type at least one character")
            cache.update(text=text, ids=ids, labels=token_labels(tokenizer, ids),
                         weights=attention_weights(model, torch.tensor(ids), device))
            q, first = controls["query"], cache.pop("query", None)  # asked-for query: 1st text
            q.options = [(f"{i}: {lab}", i) for i, lab in enumerate(cache["labels"])]
            q.value = len(ids) - 1 if first is None or first >= len(ids) else first
        return cache

    def update(w: Explorer) -> None:
        c = {k: v.value for k, v in w.controls.items()}
        data = encode(c["text"])
        labels, q = data["labels"], w.controls["query"].value
        weights = data["weights"][c["layer"], c["head"]]  # (seq, seq)
        top = int(weights[q].argmax())
        w.result = {"layer": c["layer"], "head": c["head"], "query": q, "weights": weights,
                    "labels": labels, "top_key": top, "top_weight": float(weights[q, top])}
        n = len(labels)
        fig, (ax0, ax1) = _figure(11, 5.2, 2)
        im = ax0.imshow(weights.numpy(), cmap="viridis", vmin=0, vmax=1)
        ax0.add_patch(_row_box(q, n))
        ticks = range(n)
        ax0.set_xticks(ticks, labels, rotation=90, fontsize=7)
        ax0.set_yticks(ticks, labels, fontsize=7)
        ax0.set(xlabel="key token (looked at)", ylabel="query token (looking)",
                title=f"layer {c['layer']}, head {c['head']}")
        fig.colorbar(im, ax=ax0, label="attention weight", shrink=0.8)
        ax1.bar(ticks, weights[q].numpy(), color=["C3" if i == top else "C0" for i in ticks])
        ax1.set_xticks(ticks, labels, rotation=90, fontsize=7)
        ax1.set(ylim=(0, 1), xlabel="key token", ylabel="attention weight",
                title=f"where token {q} '{labels[q]}' looks")
        w.show(fig, f"layer {c['layer']}, head {c['head']}: token {q} '{labels[q]}' looks most "
                    f"at token {top} '{labels[top]}' (weight {weights[q, top]:.2f})")

    return Explorer("Attention explorer", controls, update)


def _row_box(row: int, n: int):
    from matplotlib.patches import Rectangle
    return Rectangle((-0.5, row - 0.5), n, 1, fill=False, edgecolor="C3", lw=2)


# ------------------------------------------------------------ chapter 03: KV-cache calculator
PRESET_NAMES = [("Llama 3 8B", "llama3-8b"), ("Llama 3 70B", "llama3-70b"),
                ("Llama 3.1 405B", "llama3.1-405b"), ("Llama 3.2 1B", "llama3.2-1b"),
                ("Llama 3.2 3B", "llama3.2-3b"), ("tiny (this course)", "tiny")]
CONTEXTS = [2 ** k for k in range(7, 18)]  # 128 .. 131072 tokens, a log scale


def _tokens(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 else str(n)


def _gib(n_bytes: float) -> str:
    gib = n_bytes / GiB
    return f"{gib:,.2f} GiB" if gib >= 0.01 else f"{gib:.2g} GiB"


def kv_cache_calculator(preset: str = "llama3-8b", context: int = 8192, batch: int = 1,
                        dtype: str = "bfloat16", heads: str = "GQA") -> Explorer:
    """Memory of the weights against memory of the KV cache, for a Llama 3 preset.

    `heads` asks what the cache would be with MHA (one KV head per query head), GQA (the
    model's own n_kv_heads) or MQA (a single KV head). Weights and cache use `dtype`. The
    numbers are `config.weight_bytes` and `config.kv_cache_bytes`, shown in GiB."""
    get_preset(preset)  # an unknown name fails here, with the list of names
    if context not in CONTEXTS:
        raise ValueError(f"context ({context}) must be a power of two from 128 to 131072")
    controls = {
        "preset": widgets.Dropdown(options=PRESET_NAMES, value=preset, description="model"),
        "context": widgets.SelectionSlider(options=[(_tokens(n), n) for n in CONTEXTS],
                                           value=context, description="context"),
        "batch": widgets.BoundedIntText(value=batch, min=1, max=4096, description="batch"),
        "dtype": widgets.Dropdown(options=["float32", "bfloat16", "fp8", "int4"], value=dtype,
                                  description="dtype"),
        "heads": widgets.ToggleButtons(options=["MHA", "GQA", "MQA"], value=heads,
                                       description="heads"),
    }

    def update(w: Explorer) -> None:
        c = {k: v.value for k, v in w.controls.items()}
        args = get_preset(c["preset"])
        n_kv = {"MHA": args.n_heads, "GQA": args.kv_heads, "MQA": 1}[c["heads"]]
        cache = kv_cache_bytes(args, c["context"], c["batch"], c["dtype"], n_kv)
        weights = weight_bytes(args, c["dtype"])
        w.result = {"n_kv_heads": n_kv, "cache_bytes": cache, "weight_bytes": weights,
                    "cache_gib": cache / GiB, "weights_gib": weights / GiB}
        name = dict((v, k) for k, v in PRESET_NAMES)[c["preset"]]
        fig, ax = _figure(8, 2.6)
        bars = ax.barh(["KV cache", "weights"], [cache / GiB, weights / GiB], color=["C1", "C0"])
        ax.bar_label(bars, [_gib(cache), _gib(weights)], padding=3)
        ax.set_xlim(0, 1.25 * max(cache, weights) / GiB)
        ax.set(xlabel="memory (GiB)", title=f"{name}, {_tokens(c['context'])} tokens × batch "
               f"{c['batch']}, {c['dtype']}, {c['heads']} ({n_kv} KV heads of {args.n_heads})")
        w.show(fig, f"<b>KV cache</b> {cache / GiB:,.3f} GiB = {cache:,.0f} bytes "
                    f"({n_kv} KV heads, {cache / (c['context'] * c['batch']) / 1024:,.1f} KiB "
                    f"per token) · <b>weights</b> {weights / GiB:,.2f} GiB")

    return Explorer("KV-cache calculator", controls, update)


# ------------------------------------------------------------------ chapter 05: cache growth
def cache_growth_widget(model, prompt_ids, max_new_tokens: int = 32, tokenizer=None,
                        layer: int = 0, device=None, **sampling) -> Explorer:
    """Watch a KV cache fill as `model` generates from `prompt_ids`, one token per step.

    The generation runs once, up front, into a preallocated cache (`make_cache`); the
    slider (or its play button) then shows step t: left, the keys of `layer` stored at each
    position (blank rows are allocated but not yet written); right, the bytes written so far
    against the bytes allocated. After step t >= 1 the cache holds the prompt and the first
    t - 1 new tokens: the newest token enters it at the next step. `sampling` takes
    `generate`'s options (temperature, top_k, top_p, seed, stop_tokens)."""
    from codecs import getincrementaldecoder
    from html import escape

    from .generate import generate_steps  # widgets sit on top: import at call time
    from .kv_cache import make_cache

    prompt_ids = [int(t) for t in prompt_ids]
    plen, total = len(prompt_ids), len(prompt_ids) + max_new_tokens
    if not 0 <= layer < model.params.n_layers:
        raise ValueError(f"layer ({layer}) must be between 0 and {model.params.n_layers - 1}")
    model_device(model, device)  # the model's device: `device`, if given, must name it
    cache = make_cache(model, max_seq_len=total)
    new = [int(nxt[0]) for nxt, _, _ in generate_steps(
        model, [prompt_ids], max_new_tokens, cache=cache, **sampling)]
    keys = cache[layer].cache_k[0].flatten(1).float().cpu()  # (total, n_kv_heads * head_dim)
    per_position = cache.bytes_per_position
    filled_after = [0] + [plen + t for t in range(len(new))]  # step t -> positions written
    play = widgets.Play(value=0, min=0, max=len(new), interval=400, description="play")
    controls = {"step": widgets.IntSlider(value=0, min=0, max=len(new), description="step")}
    widgets.link((play, "value"), (controls["step"], "value"))

    def text_of(ids) -> str:
        if tokenizer is None:
            return " ".join(map(str, ids))
        # as stream() does: bytes of a character not yet complete are held back
        return getincrementaldecoder("utf-8")(errors="replace").decode(tokenizer.decode_bytes(ids))

    def update(w: Explorer) -> None:
        step = w.controls["step"].value
        filled = filled_after[step]
        shown = keys.clone()
        shown[filled:] = float("nan")  # allocated, not written yet
        w.result = {"step": step, "filled": filled, "new_tokens": new[:step],
                    "filled_bytes": filled * per_position, "allocated_bytes": cache.nbytes,
                    "text": text_of(new[:step]), "keys": shown}
        fig, (ax0, ax1) = _figure(10, 3.6, 2)
        limit = float(keys.abs().max()) or 1.0
        image = ax0.imshow(shown.T.numpy(), aspect="auto", cmap="RdBu", vmin=-limit,
                           vmax=limit, interpolation="nearest")
        fig.colorbar(image, ax=ax0, label="key value (after RoPE)")
        ax0.axvline(plen - 0.5, color="k", lw=0.8, ls=":")
        ax0.set(xlabel="position (prompt left of the dotted line)",
                ylabel="KV head x head dim", title=f"layer {layer} keys: {filled} of {total} "
                f"positions written")
        steps = np.arange(len(filled_after))
        ax1.plot(steps, np.array(filled_after) * per_position / 1024, label="written")
        ax1.axhline(cache.nbytes / 1024, color="C1", ls="--", label="allocated")
        ax1.plot([step], [filled * per_position / 1024], "o", color="C3", label=f"step {step}")
        ax1.set(xlabel="generation step", ylabel="KV cache (KiB, all layers)",
                title="cache memory as it grows")
        ax1.legend(fontsize=8, loc="lower right")
        w.show(fig, f"step {step}: {filled} positions written, {filled * per_position:,} of "
                    f"{cache.nbytes:,} bytes · generated: <code>{escape(repr(w.result['text']))}"
                    "</code>")

    box = Explorer("Cache growth", controls, update, extra=[play])
    box.controls["play"] = play
    return box
