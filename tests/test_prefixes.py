"""The template's final ':' is found from token byte spans, whatever the tokenizer merges."""

import pytest

from fgdilp_cpp.errors import FgdilpError
from fgdilp_cpp.method.prefixes import NEG_PREFIX, NEG_TEMPLATE, POS_PREFIX, locate_template_end, prefix_alone, prefixed


class FakeTokenizer:
    """Greedy longest-match over a fixed piece list; id 0 is BOS (renders as nothing)."""

    def __init__(self, pieces):
        self.pieces = [b""] + [p.encode() for p in pieces]

    def tokenize(self, text):
        data, out, i = text.encode(), [0], 0
        while i < len(data):
            best = max((j for j, p in enumerate(self.pieces) if p and data.startswith(p, i)),
                       key=lambda j: len(self.pieces[j]), default=None)
            if best is None:
                self.pieces.append(data[i:i + 1])
                best = len(self.pieces) - 1
            out.append(best)
            i += len(self.pieces[best])
        return out

    def token_bytes(self, t):
        return self.pieces[t]


@pytest.mark.parametrize("pieces", [
    [],                                   # one byte per token
    ["toxic:", " The"],                   # ':' inside a longer piece
    [": T", "toxic"],                     # ':' merged with the prompt's first letters
    ["supportive: ", "abusive"],
])
@pytest.mark.parametrize("template", [NEG_PREFIX, POS_PREFIX])
def test_colon_found_from_span(pieces, template):
    tok = FakeTokenizer(pieces)
    prompt = "The note said: go away: now"       # colons in the prompt must not confuse it
    p = prefixed(tok.tokenize, tok.token_bytes, template, prompt)
    text_before = b"".join(tok.token_bytes(t) for t in p.tokens[:p.colon_index])
    colon_piece = tok.token_bytes(p.tokens[p.colon_index])
    assert b":" in colon_piece
    # the colon token covers the template's last character
    assert len(text_before) < len(template.rstrip().encode()) <= len(text_before) + len(colon_piece)
    assert p.prompt_start == p.colon_index + 1


def test_colon_in_self_generated_text_before_template():
    # FGDILP puts a sample before the template: "first colon" would be wrong there
    tok = FakeTokenizer([])
    template = "Ratio 3:1 was rude. " + NEG_PREFIX
    p = prefixed(tok.tokenize, tok.token_bytes, template, "hello")
    assert tok.token_bytes(p.tokens[p.colon_index]) == b":"
    assert p.colon_index == len(template.rstrip())  # BOS + one token per byte


def test_template_missing():
    tok = FakeTokenizer([])
    with pytest.raises(FgdilpError):
        locate_template_end(tok.tokenize("something else"), tok.token_bytes, NEG_PREFIX)


def test_prompt_repeating_the_template():
    tok = FakeTokenizer([])
    p = prefixed(tok.tokenize, tok.token_bytes, "Say: ", "x Say: y")
    assert p.colon_index == 4   # BOS, S, a, y, ':' of the template, not of the prompt


@pytest.mark.parametrize("pieces", [[], ["toxic:", " The"], ["supportive:", "abusive"]])
@pytest.mark.parametrize("template", [NEG_PREFIX, POS_PREFIX, "a sample with: a colon" + NEG_TEMPLATE])
def test_prefix_alone_ends_at_the_colon_then_the_prompts_last_token(pieces, template):
    """--contrast reply: the template up to its final ':' (trailing space dropped), then the given
    token; the ':' is the second-last token, so its row is decoded before the last tokens."""
    tok = FakeTokenizer(pieces)
    p = prefix_alone(tok.tokenize, tok.token_bytes, template, 12345)
    assert p.tokens[-1] == 12345 and p.colon_index == len(p.tokens) - 2 == p.prompt_start - 1
    assert b"".join(tok.token_bytes(t) for t in p.tokens[:-1]) == template.rstrip().encode()
    assert tok.token_bytes(p.tokens[p.colon_index]).endswith(b":")
