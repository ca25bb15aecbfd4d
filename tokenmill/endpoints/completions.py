"""`/v1/completions`: raw prompts, as lm-evaluation-harness and older clients use them.

`prompt` is a string, a list of token ids, or a list of either (k prompts, k engine requests);
prompt i's sample j is choice i * n + j. `echo` puts the prompt before each choice's text and, with
`logprobs`, the prompt tokens' logprobs before the generated ones (the first prompt token has
none: null, as OpenAI); with `max_tokens` 0 that is all a choice holds (a loglikelihood request).
`best_of` samples that many per prompt and returns the n with the highest cumulative logprob.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tokenmill.endpoints.base import Call, Endpoint, Prompt, Streamer, check_fields, typed, usage
from tokenmill.endpoints.sampling import SAMPLING_FIELDS, SHAPED_FIELDS, sampling_params, with_defaults
from tokenmill.endpoints.text_stream import TextStreamer
from tokenmill.errors import RequestError
from tokenmill.outputs import CompletionOutput, EngineOutput, RequestOutput, TokenLogprobs

if TYPE_CHECKING:
    from tokenmill.frontend import Frontend

COMPLETIONS_URL = "/v1/completions"
MAX_PROMPTS = 2048
USED_FIELDS = frozenset({"prompt", "max_tokens", "logprobs", "echo", "best_of", "response_format", "stream",
                         "stream_options", *SAMPLING_FIELDS, *SHAPED_FIELDS})
REFUSED_FIELDS = {"suffix": "is not supported: this server does not fill in the middle"}
PROMPT_FORMS = "a string, a list of token ids, or a non-empty list of strings and token-id lists"


@dataclass
class CompletionCall(Call):
    prompt_inputs: list[str | list[int]] = field(default_factory=list)
    echo: bool = False
    top_logprobs: int | None = None  # as the client asked (best_of computes logprobs regardless)
    best_of: int | None = None
    prompt_texts: list[str] = field(default_factory=list)  # for echo: set by prepare
    first_tokens: list[str] = field(default_factory=list)  # for echo: each prompt's first token's text


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(type(t) is int for t in value)


def _prompts(value: Any) -> list[str | list[int]]:
    if isinstance(value, str) or _is_token_ids(value):
        return [value]
    if not (isinstance(value, list) and value and all(isinstance(p, str) or _is_token_ids(p) for p in value)):
        raise RequestError("invalid_type", f"body.prompt must be {PROMPT_FORMS}", "prompt")
    if len(value) > MAX_PROMPTS:
        raise RequestError("invalid_value", f"body.prompt has {len(value)} prompts; at most {MAX_PROMPTS} are "
                                            "allowed", "prompt")
    return list(value)


def completion_logprobs(entries: Sequence[TokenLogprobs | None], token_ids: Sequence[int], top: int,
                        offset: int = 0, first_text: str = "") -> dict[str, Any]:
    """The completions logprobs object of tokens; an entry None is a token without logprobs, the
    first of an echoed prompt, whose text is `first_text`. Text offsets count from `offset`."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for token_id, entry in zip(token_ids, entries):
        text = entry[token_id].decoded_token or "" if entry is not None else first_text
        tokens.append(text)
        token_logprobs.append(entry[token_id].logprob if entry is not None else None)
        top_logprobs.append({lp.decoded_token or "": lp.logprob for lp in entry.values() if lp.rank <= top}
                            if entry is not None else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


class CompletionStreamer(TextStreamer):
    """With echo, a choice's first chunk starts with its prompt (and the prompt's logprobs)."""

    object_name = "text_completion"

    def __init__(self, call: Call, request_id: str, model: str) -> None:
        super().__init__(call, request_id, model)
        self.prompt_logprobs: dict[int, tuple[list[TokenLogprobs | None], list[int]]] = {}

    def start(self) -> list[str]:
        return []

    def choice_deltas(self, index: int, completion: CompletionOutput, text: str,
                      start_token: int) -> list[dict[str, Any]]:
        call = self.call
        assert isinstance(call, CompletionCall)
        prompt_index = index // self.n
        first = call.echo and start_token == 0 and self.sent_chars[index] == 0
        logprobs = None
        if call.top_logprobs is not None and completion.logprobs is not None:
            entries: list[TokenLogprobs | None] = list(completion.logprobs[start_token:])
            token_ids = completion.token_ids[start_token:]
            offset = self.sent_chars[index] + (len(call.prompt_texts[prompt_index]) if call.echo else 0)
            if first:
                prompt = self.prompt_logprobs[prompt_index]
                entries, token_ids, offset = prompt[0] + entries, prompt[1] + token_ids, 0
            logprobs = completion_logprobs(entries, token_ids, call.top_logprobs, offset,
                                           call.first_tokens[prompt_index] if first else "")
        return [{"text": (call.prompt_texts[prompt_index] if first else "") + text,
                 "finish_reason": completion.finish_reason, "logprobs": logprobs}]

    def update(self, index: int, output: RequestOutput) -> list[str]:
        if output.prompt_logprobs is not None:
            self.prompt_logprobs[index] = (list(output.prompt_logprobs), list(output.prompt_token_ids))
        return super().update(index, output)


class Completions(Endpoint):
    url = COMPLETIONS_URL
    task = "generate"
    id_prefix = "cmpl"
    prompt_field = "prompt"

    def parse(self, body: Any) -> CompletionCall:
        if not isinstance(body, dict):
            raise RequestError("invalid_body", "body must be a JSON object")
        check_fields(body, self.url, USED_FIELDS, REFUSED_FIELDS)
        prompts = _prompts(body.get("prompt"))
        echo = typed(body, "echo", (bool,)) is True
        top = typed(body, "logprobs", (int,))
        n, best_of = typed(body, "n", (int,)) or 1, typed(body, "best_of", (int,))
        extra: dict[str, Any] = {"logprobs": top, "prompt_logprobs": top if echo else None}
        if best_of is not None:
            if best_of < n:
                raise RequestError("invalid_value", f"body.best_of must be >= n ({n}), got {best_of}", "best_of")
            if body.get("stream") is True and best_of != n:
                raise RequestError("invalid_value", "body.best_of cannot be combined with stream", "best_of")
            # NOTE: ranking needs each sample's cumulative logprob, so logprobs are computed anyway.
            extra.update(n=best_of, logprobs=top or 0)
        params = sampling_params(body, typed(body, "max_tokens", (int,)), **extra)
        return CompletionCall(body, params, prompt_inputs=prompts, echo=echo, top_logprobs=top,
                              best_of=best_of if best_of != n else None)

    def prepare(self, frontend: Frontend, call: Call) -> None:
        assert isinstance(call, CompletionCall)
        prompts: list[Prompt] = []
        for i, prompt in enumerate(call.prompt_inputs):
            try:
                prompts.append(frontend.tokenize(prompt))
            except RequestError as e:
                raise self.prompt_error(e, i, len(call.prompt_inputs)) from None
        call.prompts = prompts
        if call.echo:
            decode = frontend.tokenizer.decode
            call.prompt_texts = [text if text is not None else decode(ids) for text, ids in prompts]
            call.first_tokens = [decode(ids[:1]) for _, ids in prompts]
        call.params = with_defaults(call.params, call.body, frontend.generation_defaults)
        if call.params.structured_outputs is not None:
            frontend.compile(call.params.structured_outputs)

    def _choice(self, call: CompletionCall, output: RequestOutput, prompt_index: int,
                completion: CompletionOutput) -> dict[str, Any]:
        echo = call.prompt_texts[prompt_index] if call.echo else ""
        logprobs = None
        if call.top_logprobs is not None:
            entries: list[TokenLogprobs | None] = []
            token_ids: list[int] = []
            if call.echo and output.prompt_logprobs is not None:
                entries, token_ids = list(output.prompt_logprobs), list(output.prompt_token_ids)
            entries += completion.logprobs or []
            logprobs = completion_logprobs(entries, token_ids + completion.token_ids, call.top_logprobs,
                                           first_text=call.first_tokens[prompt_index] if call.echo else "")
        return {"text": echo + completion.text, "finish_reason": completion.finish_reason, "logprobs": logprobs}

    def respond(self, call: Call, outputs: Sequence[EngineOutput], request_id: str, model: str) -> dict[str, Any]:
        assert isinstance(call, CompletionCall)
        n = call.body.get("n") or 1
        choices = []
        for i, output in enumerate(outputs):
            assert isinstance(output, RequestOutput)
            completions = output.outputs
            if call.best_of is not None:
                completions = sorted(completions, key=lambda c: -(c.cumulative_logprob or 0.0))[:n]
            choices += [{"index": i * n + j, **self._choice(call, output, i, c)} for j, c in enumerate(completions)]
        return {"id": request_id, "object": "text_completion", "created": call.created, "model": model,
                "choices": choices, "usage": usage([o for o in outputs if isinstance(o, RequestOutput)])}

    def streamer(self, call: Call, request_id: str, model: str) -> Streamer:
        return CompletionStreamer(call, request_id, model)
