"""A conversation with a model: the history kept in Llama 3's chat format, the reply streamed
as text while its tokens are made (generate.stream_pieces, with the KV cache), stopped at
<|eot_id|>, and the oldest turns dropped when the window fills (never the system prompt).

    model, tokenizer = load_pretrained("qa-full")
    chat = Conversation(model, tokenizer)
    for piece in chat.send("Once upon a time, ... Who is the hero of the story?"):
        print(piece, end="", flush=True)

`run_chat` is the terminal loop of `llama3-mini chat` (/reset, /system TEXT, /exit);
`dialog_prompt_ids` builds a dialog's prompt ids within a window, for any caller (the
server builds its prompts with it too)."""
from __future__ import annotations

import sys
import time
from typing import Iterator

from .generate import stream_pieces
from .tokenizer import ChatFormat


def dialog_prompt_ids(chat_format: ChatFormat, messages: list[dict], max_seq_len: int,
                      max_new_tokens: int) -> tuple[list[int], int]:
    """(prompt ids, n_dropped): the dialog as `chat_format.encode_dialog_prompt` encodes it
    (ending with an open assistant header), after dropping its oldest messages until the
    prompt plus max_new_tokens fits max_seq_len. The leading system messages and the last
    message are never dropped; a kept part never starts with an assistant message (its
    question went with the older turn). n_dropped counts the messages dropped.

    With a 10-token window, 2 new tokens and messages of 5, 3 and 3 tokens after a BOS and
    before a 2-token header: [bos, 5, 3, 3, header] is 14 + 2 > 10, so the first message
    goes; [bos, 3, 3, header] is 9 + 2 > 10, so the second goes too: ids of
    [bos, message 3, header], n_dropped 2.

    Raises ValueError when even the system messages and the last message do not fit."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) must be at least 1")
    if not messages:
        raise ValueError("messages is empty: a dialog needs at least one message")
    n_system = 0
    while n_system < len(messages) - 1 and messages[n_system].get("role") == "system":
        n_system += 1
    encoded = [chat_format.encode_message(m) for m in messages]  # validates each message
    tok = chat_format.tokenizer
    head = [tok.bos_id] + [t for ids in encoded[:n_system] for t in ids]
    tail = chat_format.encode_header({"role": "assistant", "content": ""})
    room = max_seq_len - max_new_tokens - len(head) - len(tail)
    start = len(messages) - 1  # the last message is always kept
    used = len(encoded[start])
    if used > room:
        raise ValueError(
            f"the last message ({used} tokens), with the system prompt and the chat format "
            f"({len(head) + len(tail)} tokens) and max_new_tokens ({max_new_tokens}), needs "
            f"{used + len(head) + len(tail) + max_new_tokens} tokens, more than the model's "
            f"window (max_seq_len {max_seq_len}): shorten the message or the system prompt, "
            f"or lower max_new_tokens")
    while start > n_system and used + len(encoded[start - 1]) <= room:
        start -= 1
        used += len(encoded[start])
    while start < len(messages) - 1 and messages[start].get("role") == "assistant":
        start += 1  # a reply whose question was dropped goes with it
    ids = head + [t for m in encoded[start:] for t in m] + tail
    return ids, start - n_system


class Conversation:
    """A chat with `model`: the turns so far (`messages`, user and assistant alternating),
    an optional `system` prompt (settable at any time; None or "" for none) and the sampling
    settings of each reply (temperature 0 is greedy; top_p the nucleus; seed, when given,
    makes sampled replies reproducible: reply n uses seed + n).

    `send(text)` streams the reply; once it ends the reply joins the history. After each
    reply, `dropped` says how many old messages were removed to fit the window (they stay
    removed), `reply_ids` holds the tokens made (without the stop token), `finish_reason`
    is "stop" (a stop token) or "length" (max_new_tokens reached), and `seconds` the time
    from the request to the last token."""

    def __init__(self, model, tokenizer, system: str | None = None, temperature: float = 0.0,
                 top_p: float | None = None, max_new_tokens: int = 128,
                 seed: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.chat_format = ChatFormat(tokenizer)
        self.system, self.temperature, self.top_p = system, temperature, top_p
        self.max_new_tokens, self.seed = max_new_tokens, seed
        self.messages: list[dict] = []
        self.dropped, self.reply_ids, self.finish_reason, self.seconds = 0, [], None, 0.0
        self._n_replies = 0

    @property
    def max_seq_len(self) -> int:
        return self.model.params.max_seq_len

    def dialog(self, user_text: str | None = None) -> list[dict]:
        """The messages a prompt is made of: the system prompt (if any), the history, then
        `user_text` as the newest user message (if given)."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        new = [] if user_text is None else [{"role": "user", "content": user_text}]
        return head + self.messages + new

    def prompt_ids(self, user_text: str) -> tuple[list[int], int]:
        """(ids, n_dropped) of the prompt that `send(user_text)` would give the model."""
        return dialog_prompt_ids(self.chat_format, self.dialog(user_text), self.max_seq_len,
                                 self.max_new_tokens)

    def reset(self) -> None:
        """Forget every turn (the system prompt and the settings stay)."""
        self.messages, self.dropped, self.reply_ids, self.finish_reason = [], 0, [], None

    def send(self, user_text: str) -> Iterator[str]:
        """Stream the reply to `user_text` as pieces of text, each yielded as soon as its
        tokens complete a character (a UTF-8 character split across tokens waits for its
        last byte). A message that cannot fit the window raises ValueError here, before
        anything changes. The message and the reply (what was made, even if the stream is
        closed early) join the history as the stream runs."""
        if not isinstance(user_text, str):
            raise TypeError(f"user_text must be a str, got {type(user_text).__name__}")
        if self.temperature < 0 or not (self.top_p is None or 0 < self.top_p <= 1):
            raise ValueError(f"temperature ({self.temperature}) must be >= 0 (0 is greedy) "
                             f"and top_p ({self.top_p}) in (0, 1] or None")
        start = time.perf_counter()
        ids, dropped = self.prompt_ids(user_text)
        return self._stream(user_text, ids, dropped, start)

    def _stream(self, user_text: str, ids: list[int], dropped: int, start: float):
        self.messages = self.messages[dropped:]  # dropped counts from after the system prompt
        self.messages.append({"role": "user", "content": user_text})
        self.dropped, self.reply_ids, self.finish_reason = dropped, [], "length"
        seed = None if self.seed is None else self.seed + self._n_replies
        self._n_replies += 1
        stops = {int(t) for t in self.tokenizer.stop_tokens}
        try:
            for piece in stream_pieces(self.model, self.tokenizer, ids, self.max_new_tokens,
                                       temperature=self.temperature, top_p=self.top_p,
                                       seed=seed, stop_tokens=stops):
                if piece.token not in stops:
                    self.reply_ids.append(piece.token)
                self.finish_reason = piece.finish_reason or self.finish_reason
                if piece.text:
                    yield piece.text
        finally:
            self.seconds = time.perf_counter() - start
            reply = self.tokenizer.decode(self.reply_ids)
            self.messages.append({"role": "assistant", "content": reply})

    def reply(self, user_text: str) -> str:
        """The whole reply to `user_text` at once (`send`, joined)."""
        return "".join(self.send(user_text))


HELP = ("type a message and press Enter; /reset forgets the conversation, /system TEXT sets the "
        "system prompt (/system alone removes it), /exit (or end of input, Ctrl-D) quits")


def run_chat(conversation: Conversation, stdin=None, stdout=None, prompt: str = "you> ",
             speaker: str = "model> ") -> None:
    """The terminal conversation of `llama3-mini chat`: read a line, stream the reply,
    repeat. Lines starting with / are commands (HELP); end of input exits cleanly. Notes in
    [brackets] say when old messages were dropped to fit the window, when a reply stopped at
    max_new_tokens, and what a command did."""
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout

    def say(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    say(f"[{HELP}]\n")
    while True:
        say(prompt)
        line = stdin.readline()
        if not line:  # end of input
            say("\n")
            return
        text = line.rstrip("\r\n")
        command, _, rest = text.strip().partition(" ")
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            conversation.reset()
            say("[conversation reset]\n")
        elif command == "/system":
            conversation.system = rest.strip() or None
            say(f"[system prompt: {conversation.system!r}]\n")
        elif command.startswith("/"):
            say(f"[unknown command {command}; {HELP}]\n")
        elif text.strip():
            _reply(conversation, text, say, speaker)


def _reply(conversation: Conversation, text: str, say, speaker: str) -> None:
    """Stream one reply to the terminal; Ctrl-C stops the reply, not the chat."""
    try:
        pieces = conversation.send(text)
    except ValueError as error:  # the message cannot fit the window
        say(f"[{error}]\n")
        return
    say(speaker)
    try:
        for piece in pieces:
            say(piece)
    except KeyboardInterrupt:
        pieces.close()
        say(" [interrupted]")
    say("\n")
    if conversation.dropped:
        say(f"[dropped the {conversation.dropped} oldest message(s) to fit the model's "
            f"{conversation.max_seq_len}-token window]\n")
    if conversation.finish_reason == "length":
        say(f"[stopped at max_new_tokens ({conversation.max_new_tokens})]\n")
