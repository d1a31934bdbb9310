"""The widgets in a real browser: JupyterLab serves a copy of notebooks/, headless Chromium
(through Playwright) runs every cell of each widget notebook, then moves each widget's
controls as a learner would (slider handles with the keyboard, readouts typed into, menus,
buttons) and checks that the readout shows the right numbers, computed here from the
package, and that the figure is redrawn. Screenshots go to tests/screenshots/ (ignored).

Needs /usr/bin/chromium and the playwright package; elsewhere than CI they skip without."""
from __future__ import annotations

import math

import pytest
import torch
from browser_support import CHROMIUM_ARGS, JupyterLab, chromium_or_skip, open_and_run, screenshot

from llama3_mini.config import GiB, get_preset, kv_cache_bytes, weight_bytes
from llama3_mini.rope import apply_scaling, rope_frequencies
from llama3_mini.widgets import attention_weights, token_labels

pytestmark = pytest.mark.slow  # a JupyterLab server and a browser: `make test`, not test-fast


@pytest.fixture(scope="module")
def browser_and_lab():
    """One JupyterLab server and one headless Chromium for the whole module."""
    chromium = chromium_or_skip()
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=30_000)
    with JupyterLab() as lab, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield browser, lab
        finally:
            browser.close()


@pytest.fixture(scope="module")
def notebook(browser_and_lab):
    """notebook(name, done_text): a tab with that notebook's cells all run, opened once per
    module (each in its own tab: no unsaved-changes prompt); kernels end with the module."""
    browser, lab = browser_and_lab
    pages = {}

    def open_notebook(name: str, done_text: str):
        if name not in pages:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.bring_to_front()
            open_and_run(page, lab, name, done_text)
            pages[name] = page
        pages[name].bring_to_front()  # a background tab does not draw its widgets
        return pages[name]

    yield open_notebook
    for page in pages.values():
        page.close()
    lab.shutdown_kernels()


def changed(page, widget, before: str) -> str:
    """Wait until the widget's figure is redrawn (a new image URL); return the new URL."""
    image = widget.locator(".l3m-figure")
    page.wait_for_function("([el, old]) => el.getAttribute('src') !== old",
                           arg=[image.element_handle(), before], timeout=30_000)
    return image.get_attribute("src")


def type_into_readout(page, control, value) -> None:
    readout = control.locator(".widget-readout")
    readout.click()
    page.keyboard.press("Control+A")
    page.keyboard.type(str(value))
    page.keyboard.press("Enter")


def test_rope_explorer(notebook):
    from playwright.sync_api import expect

    page = notebook("02_rmsnorm_and_rope.ipynb", "✓ rope_scores: right on all")
    w = page.locator(".l3m-rope-explorer")
    w.scroll_into_view_if_needed()
    readout, src = w.locator(".l3m-readout"), w.locator(".l3m-figure").get_attribute("src")
    screenshot(page, "rope_explorer_0")

    def expect_pair(pair, position, theta=500000.0, scaled=False):
        freqs = rope_frequencies(128, theta).double()
        freq = (apply_scaling(freqs) if scaled else freqs)[pair].item()
        turned = math.degrees((position * freq) % (2 * math.pi))
        expect(readout).to_contain_text(f"pair {pair}: frequency {freq:.4g} rad/token")
        expect(readout).to_contain_text(f"at position {position} it has turned {turned:.1f}°")

    expect_pair(16, 100)
    handle = w.locator(".l3m-control-pair .noUi-handle")
    handle.focus()
    for _ in range(3):
        page.keyboard.press("ArrowRight")  # the pair slider moved with the keyboard: 16 -> 19
    expect_pair(19, 100)
    src = changed(page, w, src)
    type_into_readout(page, w.locator(".l3m-control-position"), 1000)
    expect_pair(19, 1000)
    src = changed(page, w, src)
    w.locator(".l3m-control-theta select").select_option(label="10,000 (Llama 2)")
    expect_pair(19, 1000, theta=10000.0)
    src = changed(page, w, src)
    screenshot(page, "rope_explorer_1")
    type_into_readout(page, w.locator(".l3m-control-pair"), 60)
    expect_pair(60, 1000, theta=10000.0)
    src = changed(page, w, src)
    w.locator(".l3m-control-scaled input").check()  # Llama 3.1 scaling: pair 60 turns 8x slower
    expect_pair(60, 1000, theta=10000.0, scaled=True)
    changed(page, w, src)
    screenshot(page, "rope_explorer_2")


def calculator_numbers(preset, context, batch=1, dtype="bfloat16", heads="GQA"):
    args = get_preset(preset)
    n_kv = {"MHA": args.n_heads, "GQA": args.kv_heads, "MQA": 1}[heads]
    cache = kv_cache_bytes(args, context, batch, dtype, n_kv_heads=n_kv)
    return [f"KV cache {cache / GiB:,.3f} GiB = {cache:,.0f} bytes", f"{n_kv} KV heads",
            f"weights {weight_bytes(args, dtype) / GiB:,.2f} GiB"]


def test_kv_cache_calculator(notebook):
    from playwright.sync_api import expect

    page = notebook("03_attention_and_gqa.ipynb", "heads alike: the converted layer equals")
    w = page.locator(".l3m-kv-cache-calculator")
    w.scroll_into_view_if_needed()
    readout, src = w.locator(".l3m-readout"), w.locator(".l3m-figure").get_attribute("src")
    screenshot(page, "kv_cache_calculator_0")
    settings = {"preset": "llama3-8b", "context": 131072}
    steps = [
        ("preset", "llama3-70b", lambda: w.locator(".l3m-control-preset select")
         .select_option(label="Llama 3 70B")),
        ("heads", "MHA", lambda: w.locator(".l3m-control-heads button", has_text="MHA").click()),
        ("context", 128, lambda: (w.locator(".l3m-control-context .noUi-handle").focus(),
                                  page.keyboard.press("Home"))),
        ("context", 512, lambda: [page.keyboard.press("ArrowRight") for _ in range(2)]),
        ("batch", 4, lambda: (w.locator(".l3m-control-batch input").fill("4"),
                              page.keyboard.press("Enter"))),
        ("dtype", "float32", lambda: w.locator(".l3m-control-dtype select")
         .select_option("float32")),
        ("preset", "llama3.2-1b", lambda: w.locator(".l3m-control-preset select")
         .select_option(label="Llama 3.2 1B")),
        ("heads", "MQA", lambda: w.locator(".l3m-control-heads button", has_text="MQA").click()),
    ]
    for i, (name, value, act) in enumerate(steps, 1):
        act()
        settings[name] = value
        for text in calculator_numbers(**settings):
            expect(readout).to_contain_text(text)
        src = changed(page, w, src)
        screenshot(page, f"kv_cache_calculator_{i}")


def test_attention_explorer(notebook):
    from playwright.sync_api import expect

    from llama3_mini.checkpoint import load_pretrained

    page = notebook("labs/03_lab_copying_heads.ipynb", "the model predicts")
    w = page.locator(".l3m-attention-explorer")
    w.scroll_into_view_if_needed()
    readout, src = w.locator(".l3m-readout"), w.locator(".l3m-figure").get_attribute("src")
    screenshot(page, "attention_explorer_0")
    model, tokenizer = load_pretrained(device="cpu")

    def expect_head(text, layer, head, query=None):
        ids = tokenizer.encode(text)
        weights = attention_weights(model, torch.tensor(ids), "cpu")[layer, head]  # (seq, seq)
        labels = token_labels(tokenizer, ids)
        query = len(ids) - 1 if query is None else query
        top = int(weights[query].argmax())
        expect(readout).to_have_text(
            f"layer {layer}, head {head}: token {query} '{labels[query]}' looks most at token "
            f"{top} '{labels[top]}' (weight {weights[query, top]:.2f})")
        return labels

    text = w.locator(".l3m-control-text input").input_value()
    # as the notebook left it: the copying head, the last token of a story that ends just
    # before the friend's second mention, looking back at the friend's first mention
    labels = expect_head(text, 1, 2)
    assert labels[-1] == "." and "·Anna" in labels
    w.locator(".l3m-control-head select").select_option("0")  # another head: a new heatmap
    expect_head(text, 1, 0)
    src = changed(page, w, src)
    w.locator(".l3m-control-layer select").select_option("0")
    expect_head(text, 0, 0)
    src = changed(page, w, src)
    w.locator(".l3m-control-query select").select_option(f"5: {labels[5]}")
    expect_head(text, 0, 0, query=5)
    src = changed(page, w, src)
    screenshot(page, "attention_explorer_1")
    story = "Long ago, there was a brave cat named Tom. Tom"
    box = w.locator(".l3m-control-text input")
    box.fill(story)
    box.press("Enter")  # a new text: the last token becomes the query
    expect_head(story, 0, 0)
    w.locator(".l3m-control-layer select").select_option("1")
    expect_head(story, 1, 0)
    w.locator(".l3m-control-head select").select_option("2")
    expect_head(story, 1, 2)
    changed(page, w, src)
    screenshot(page, "attention_explorer_2")


def test_cache_growth(notebook):
    from playwright.sync_api import expect

    page = notebook("05_kv_cache_and_generation.ipynb", "positions written;")
    w = page.locator(".l3m-cache-growth")
    w.scroll_into_view_if_needed()
    readout, src = w.locator(".l3m-readout"), w.locator(".l3m-figure").get_attribute("src")
    screenshot(page, "cache_growth_0")
    # the notebook's model: 4 layers, 2 KV heads of 32 dims, float32; prompt 13 tokens, 24 new
    per_position, prompt, new = 2 * 4 * 2 * 32 * 4, 13, 24
    allocated = (prompt + new) * per_position

    def expect_step(step):
        filled = 0 if step == 0 else prompt + step - 1
        expect(readout).to_contain_text(f"step {step}: {filled} positions written, "
                                        f"{filled * per_position:,} of {allocated:,} bytes")

    expect_step(10)  # the notebook's last cell moved it to step 10
    handle = w.locator(".l3m-control-step .noUi-handle")
    handle.focus()
    for key, step in (("End", new), ("Home", 0), ("ArrowRight", 1), ("ArrowRight", 2)):
        page.keyboard.press(key)
        expect_step(step)
        src = changed(page, w, src)
    screenshot(page, "cache_growth_1")


def test_chat_widget(notebook):
    """07b's chat: type a held-out story and question, press send; the reply streams in (the
    page shows it growing) and equals the package's greedy reply to the same dialog."""
    from playwright.sync_api import expect

    from llama3_mini.chat import Conversation
    from llama3_mini.checkpoint import load_pretrained
    from llama3_mini.finetune import make_qa

    page = notebook("07b_finetuning_at_length.ipynb", "the widget's chat has 0 messages")
    w = page.locator(".l3m-chat")
    w.scroll_into_view_if_needed()
    expect(w.locator(".l3m-chat-empty")).to_be_visible()  # the cell ran: nothing generated
    e = make_qa(3, seed=11)[2]  # a story no fine-tune saw, and its question
    message = f"{e.story}\n\n{e.question}"
    chat = Conversation(*load_pretrained("qa-full", device="cpu"), max_new_tokens=40)
    expected = chat.reply(message)  # the notebook's widget: qa-full, greedy, 40 tokens at most
    w.locator(".l3m-control-message textarea").fill(message)
    page.evaluate("""(el) => { window.l3mSeen = [];  // the reply's text at every redraw
        new MutationObserver(() => {
          const r = el.querySelectorAll('.l3m-chat-assistant .l3m-chat-text');
          if (r.length) window.l3mSeen.push(r[r.length - 1].textContent);
        }).observe(el, {subtree: true, childList: true, characterData: true}); }""",
                  w.locator(".l3m-chat-transcript").element_handle())
    w.locator(".l3m-control-send").click()
    expect(w.locator(".l3m-readout")).to_contain_text(f"{len(chat.reply_ids)} tokens in",
                                                      timeout=60_000)
    expect(w.locator(".l3m-chat-assistant .l3m-chat-text")).to_have_text(expected)
    expect(w.locator(".l3m-chat-user .l3m-chat-text")).to_have_text(message)
    seen = page.evaluate("window.l3mSeen")
    assert len(set(seen)) > 2 and all(expected.startswith(s) for s in seen), seen  # streamed
    assert expected == e.answer  # and right
    screenshot(page, "chat_widget")
