"""Llama 3's chat format: a dialog of messages -> token ids, with Llama 3.1's tool calls.

Every message is a header, its text and an end token:

    <|start_header_id|>role<|end_header_id|>\\n\\n text <|eot_id|>

The dialog starts with <|begin_of_text|> and a prompt ends with an open assistant header, so
the model's next tokens are the reply. Message text is encoded as plain text, so no user can
type a control token into it.

Meta's Llama 3.0 reference (meta-llama/llama3, `llama/tokenizer.py`) ends every message with
<|eot_id|>. Llama 3.1 (and 3.2, which keeps its tokenizer) added tools, and that is what this
module follows (Meta's llama-models, `models/llama3/chat_format.py` and `tool_utils.py`; the
3.1 model card's prompt format):
- a tool's result comes back in a message of the role `ipython` (`tool` is accepted as
  another name for it, as Meta's code accepts it);
- an assistant message may carry `tool_calls`, each {"name": ..., "arguments": {...}}. The
  built-in tools brave_search, wolfram_alpha and photogen are written as a Python call
  `brave_search.call(query="...")`; code for code_interpreter is written as it is, after the
  token <|python_tag|>; any other tool as one line of JSON
  {"type": "function", "name": ..., "parameters": {...}};
- an assistant message that waits for a tool's result ends with <|eom_id|> ("end of
  message": the turn goes on once the result is in) instead of <|eot_id|>: ask for it with
  "stop_reason": "end_of_message" (Meta's name).

One difference from Meta's 3.1 code, on purpose: text is stripped of surrounding white space,
as Meta's Llama 3.0 reference and Hugging Face's chat template do (llama-models' 3.1 code keeps
it). On text without surrounding white space the ids are the same as Meta's, token for token
(tests/test_chat_format.py runs Meta's own ChatFormat)."""
from __future__ import annotations

import json

BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "photogen")  # called as name.call(query=...)
CODE_TOOL = "code_interpreter"  # its code follows <|python_tag|>
STOP_REASONS = {"end_of_turn": "<|eot_id|>", "end_of_message": "<|eom_id|>"}


def tool_call_text(call: dict) -> str:
    """How an assistant writes one tool call in Llama 3.1's format.
    {"name": "brave_search", "arguments": {"query": "llamas"}}
      -> 'brave_search.call(query="llamas")'
    {"name": "code_interpreter", "arguments": {"code": "print(2)"}} -> 'print(2)'
    {"name": "get_weather", "arguments": {"city": "Lima"}}
      -> '{"type": "function", "name": "get_weather", "parameters": {"city": "Lima"}}'"""
    if not (isinstance(call, dict) and isinstance(call.get("name"), str)
            and isinstance(call.get("arguments"), dict)):
        raise ValueError(f"a tool call is a dict {{'name': str, 'arguments': dict}}, got "
                         f"{call!r:.80}")
    name, arguments = call["name"], call["arguments"]
    if name == CODE_TOOL:
        return arguments["code"]
    if name in BUILTIN_TOOLS:
        return f'{name}.call(query="{arguments["query"]}")'
    return json.dumps({"type": "function", "name": name, "parameters": arguments})


class ChatFormat:
    """Dialogs as Llama 3.1's chat format encodes them, with Meta's names (see the module's
    docstring). A message is a dict {"role": str, "content": str}; an assistant's may add
    "tool_calls" and "stop_reason"."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def _special(self, name: str) -> int:
        return self.tokenizer.special_tokens[name]

    def encode_header(self, message: dict) -> list[int]:
        """<|start_header_id|>role<|end_header_id|>\\n\\n, the role `tool` written `ipython`."""
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise ValueError(f"a message is a dict {{'role': str, 'content': str}}, got "
                             f"{message!r:.80}")
        role = "ipython" if message["role"] == "tool" else message["role"]
        return ([self._special("<|start_header_id|>")] + self.tokenizer.encode(role)
                + [self._special("<|end_header_id|>")] + self.tokenizer.encode("\n\n"))

    def encode_message(self, message: dict) -> list[int]:
        """One message: its header, <|python_tag|> when its first tool call is code, its
        text, its tool calls, and <|eot_id|> (or <|eom_id|> when it waits for a tool)."""
        ids = self.encode_header(message)
        calls = message.get("tool_calls") or []
        stop = message.get("stop_reason", "end_of_turn")
        if ("tool_calls" in message or "stop_reason" in message) and message["role"] != "assistant":
            raise ValueError(f"only an assistant message has tool_calls or a stop_reason; "
                             f"this one's role is {message['role']!r}")
        if stop not in STOP_REASONS:
            raise ValueError(f"stop_reason {stop!r} is not one of {sorted(STOP_REASONS)}")
        if calls and isinstance(calls[0], dict) and calls[0].get("name") == CODE_TOOL:
            ids.append(self._special("<|python_tag|>"))
        ids += self.tokenizer.encode(message["content"].strip())
        for call in calls:
            ids += self.tokenizer.encode(tool_call_text(call))
        return ids + [self._special(STOP_REASONS[stop])]

    def encode_dialog_prompt(self, dialog: list[dict]) -> list[int]:
        """<|begin_of_text|>, every message, and an open assistant header."""
        ids = [self.tokenizer.bos_id]
        for message in dialog:
            ids += self.encode_message(message)
        return ids + self.encode_header({"role": "assistant", "content": ""})
