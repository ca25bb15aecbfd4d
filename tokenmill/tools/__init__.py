"""Tool calling for chat requests: OpenAI's `tools`, `tool_choice` and `parallel_tool_calls`.

Where each step goes (a chat request with `tools`; `fmt = tool_call_format(tokenizer)` once per model):
1. parse the body: `request = parse_tool_request(body)` (None: no tools), RequestError naming the field;
2. the prompt: `messages, kwargs = prepare_chat(fmt, messages, request, chat_template_kwargs)`, on
   every chat request, then the chat template as usual with those;
3. the constraint: `tool_constraint(fmt, request)` for "required" and a named function, a
   `StructuredOutputsParams` to set as the sampling params' `structured_outputs`;
4. the response: `parse_reply(fmt, request, text)` per choice: its `message()` and
   `finish_reason(engine_reason)`; streamed, one `ToolCallStream(fmt, request)` per choice.
"""

from tokenmill.tools.formats import HermesFormat, Llama3JsonFormat, ToolCallFormat, tool_call_format
from tokenmill.tools.grammar import tool_constraint
from tokenmill.tools.parser import AssistantReply, ToolCall, ToolCallStream, parse_reply
from tokenmill.tools.render import prepare_chat
from tokenmill.tools.request import FunctionTool, ToolRequest, parse_tool_request

__all__ = ["AssistantReply", "FunctionTool", "HermesFormat", "Llama3JsonFormat", "ToolCall", "ToolCallFormat",
           "ToolCallStream", "ToolRequest", "parse_reply", "parse_tool_request", "prepare_chat", "tool_call_format",
           "tool_constraint"]
