"""Character-level tokenizer for the embedded arithmetic task.

One token per character keeps every digit its own token, so a tiny model sees the column structure of an
addition directly instead of having to learn how a BPE vocabulary happened to merge digit runs. Nothing comes
from a model hub (the service must run offline), so the vocabulary is built here, deterministically: the same
ids on every machine, which matters because teacher, student and vLLM must all agree on them.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, UNK, SYSTEM, USER, ASSISTANT, END = (
    "<|pad|>",
    "<|unk|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
)
SPECIAL_TOKENS = [PAD, UNK, SYSTEM, USER, ASSISTANT, END]

# Only the assistant turn is closed by <|end|>: that is the token generation stops on, and prompts end with a
# bare <|assistant|> so the model's first sampled token is already the answer.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}<|end|>"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# The tool task's vocabulary: tokens appended after the character ids (which stay as they are): the tool
# role and the call's tags as single tokens, as Qwen2.5's vocabulary has them, and the fixed pieces of a calc
# call's JSON as merges, as a BPE vocabulary trained on such calls would have them (a call is then 12 tokens,
# not 56: what the model must learn is where to call and what to copy, not to spell JSON a character at a
# time). A tiny model cannot read a JSON schema in a system prompt, so this template renders ``tools=`` as
# their names.
TOOL, CALL_OPEN, CALL_CLOSE = "<|tool|>", "<tool_call>", "</tool_call>"
CALL_PIECES = ('{"name":"calc","arguments":{"a":', ',"op":"', '","b":', "}}")
TOOL_CHAT_TEMPLATE = (
    "{% if tools %}<|system|>{% for t in tools %}{{ t['function']['name'] }}{% if not loop.last %} "
    "{% endif %}{% endfor %}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}<|end|>"
    "{% elif message['role'] == 'tool' %}<|tool|>{{ message['content'] }}"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def vocabulary() -> dict[str, int]:
    """Special tokens first (pad = 0), then newline and printable ASCII in code-point order."""
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    return {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}


def build_tokenizer(tools: bool = False) -> PreTrainedTokenizerFast:
    """``tools``: the tool task's vocabulary and template (ids 0..101 unchanged, seven appended)."""
    # Split into single characters, keeping whitespace as tokens of its own: a space in a prompt must survive
    # a decode, so no whitespace pre-tokenizer (it would drop spaces) and a plain concatenating decoder.
    core = Tokenizer(models.WordLevel(vocab=vocabulary(), unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        eos_token=END,
        additional_special_tokens=[SYSTEM, USER, ASSISTANT],
        padding_side="left",  # decoder-only generation pads on the left
        clean_up_tokenization_spaces=False,
        model_max_length=128,
    )
    tok.chat_template = CHAT_TEMPLATE
    if tools:
        # The role token is special (skipped when decoding an answer); the tags are not, so a turn's decoded
        # text keeps its call, as Qwen2.5's tokenizer does.
        tok.add_special_tokens({"additional_special_tokens": [SYSTEM, USER, ASSISTANT, TOOL]})
        tok.add_tokens([AddedToken(t, normalized=False) for t in (CALL_OPEN, CALL_CLOSE, *CALL_PIECES)])
        tok.chat_template = TOOL_CHAT_TEMPLATE
    return tok
