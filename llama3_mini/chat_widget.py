"""A chat in the notebook (ipywidgets): type a message, press send, and the
reply streams into the transcript as its tokens are made. Built on chat.Conversation, so the
page shows exactly what `llama3-mini chat` would print: the same prompt ids, the same reply.

    from llama3_mini.chat_widget import chat_widget
    chat_widget(model, tokenizer, message="Lily was a little fox ... Who is the hero?")

Nothing is generated when the cell runs: only a press of send does that. The box keeps its
controls in `.controls` ("message", "send", "reset", "system"), the conversation in
`.conversation` and the latest reply's numbers in `.result`, so code and tests can drive it
(`w.send("...")`) and read what it shows."""
from __future__ import annotations

from html import escape

try:  # the course extra: the package itself runs without it
    import ipywidgets as widgets
except ImportError as error:
    raise ImportError(f"llama3_mini.chat_widget needs {error.name}, part of the course extra: "
                      "pip install 'llama3-mini[course]'") from error

from .chat import Conversation

# Each turn is a block of the transcript; pre-wrap keeps the message's own line breaks.
_TURN = ('<div class="l3m-chat-{role}" style="white-space: pre-wrap; margin: 4px 0; '
         'padding: 4px 8px; border-radius: 6px; background: {background}">'
         '<b>{who}</b> <span class="l3m-chat-text">{text}</span></div>')
_LOOK = {"system": ("system", "#f3f3f3"), "user": ("you", "#e8f0fe"),
         "assistant": ("model", "#eef7ee")}


def _turn(role: str, text: str) -> str:
    who, background = _LOOK[role]
    return _TURN.format(role=role, background=background, who=who, text=escape(text))


class ChatWidget(widgets.VBox):
    """A transcript (HTML), a message box, send and reset buttons, a system prompt box and a
    readout of the latest reply (tokens, tokens per second, old messages dropped)."""

    def __init__(self, conversation: Conversation, message: str = ""):
        self.conversation, self.result, self._busy = conversation, {}, False
        self.transcript = widgets.HTML()
        self.readout = widgets.HTML()
        self.controls = {
            "message": widgets.Textarea(value=message, placeholder="your message",
                                        layout=widgets.Layout(width="100%", height="6em")),
            "send": widgets.Button(description="send", button_style="primary",
                                   tooltip="send the message"),
            "reset": widgets.Button(description="reset", tooltip="forget the conversation"),
            "system": widgets.Text(value=conversation.system or "", description="system",
                                   placeholder="a system prompt (none by default)",
                                   layout=widgets.Layout(width="60%")),
        }
        for key, control in self.controls.items():
            control.add_class(f"l3m-control-{key}")  # for the browser tests' selectors
        self.transcript.add_class("l3m-chat-transcript")
        self.readout.add_class("l3m-readout")
        self.controls["send"].on_click(lambda _button: self.send())
        self.controls["reset"].on_click(lambda _button: self.reset())
        self.controls["system"].observe(self._set_system, names="value")
        buttons = widgets.HBox([self.controls["send"], self.controls["reset"],
                                self.controls["system"]])
        super().__init__([self.transcript, self.controls["message"], buttons, self.readout])
        self.add_class("l3m-chat")
        self._draw()

    def _set_system(self, change) -> None:
        self.conversation.system = change["new"].strip() or None

    def _draw(self, streaming: str | None = None) -> None:
        """The transcript: each kept message, then the reply being streamed (if any)."""
        turns = self.conversation.dialog()
        if streaming is not None:
            turns = turns + [{"role": "assistant", "content": streaming}]
        self.transcript.value = "".join(_turn(m["role"], m["content"]) for m in turns) or (
            '<div class="l3m-chat-empty"><i>No messages yet: write one below and press '
            'send.</i></div>')

    def send(self, text: str | None = None) -> str:
        """Send `text` (default: the message box's text), streaming the reply into the
        transcript piece by piece; returns the reply. The message box is emptied."""
        text = self.controls["message"].value if text is None else text
        if self._busy or not text.strip():
            return ""
        self._busy = True
        self.controls["send"].disabled = True
        reply = ""
        try:
            try:
                pieces = self.conversation.send(text)
            except ValueError as error:  # the message cannot fit the window
                self.readout.value = f"<b>not sent:</b> {escape(str(error))}"
                return ""
            self.controls["message"].value = ""
            self.readout.value = "<i>generating…</i>"
            for piece in pieces:
                reply += piece
                self._draw(streaming=reply)
            self._draw()
            self._show_result(reply)
        finally:
            self._busy = False
            self.controls["send"].disabled = False
        return reply

    def _show_result(self, reply: str) -> None:
        c = self.conversation
        n = len(c.reply_ids)
        self.result = {"reply": reply, "tokens": n, "seconds": c.seconds,
                       "dropped": c.dropped, "finish_reason": c.finish_reason}
        notes = [f"{n} tokens in {c.seconds:.2f} s ({n / max(c.seconds, 1e-9):,.0f} tokens/s)"]
        if c.finish_reason == "length":
            notes.append(f"stopped at max_new_tokens ({c.max_new_tokens})")
        if c.dropped:
            notes.append(f"dropped the {c.dropped} oldest message(s) to fit the "
                         f"{c.max_seq_len}-token window")
        self.readout.value = " · ".join(notes)

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.conversation.reset()
        self.result, self.readout.value = {}, ""
        self._draw()

    def __repr__(self) -> str:  # short and stable: it is the notebook's text/plain output
        return (f"ChatWidget({len(self.conversation.messages)} messages, "
                f"max_new_tokens={self.conversation.max_new_tokens})")


def chat_widget(model, tokenizer, message: str = "", system: str | None = None,
                **settings) -> ChatWidget:
    """A chat with `model` in the notebook, the message box filled with `message`.
    `settings` are Conversation's: temperature (0, greedy, by default), top_p,
    max_new_tokens, seed."""
    return ChatWidget(Conversation(model, tokenizer, system=system, **settings), message)
