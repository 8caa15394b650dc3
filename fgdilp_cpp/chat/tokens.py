"""Chat prompts whose messages stay text: the template's own markers are control tokens, while
special-token text inside a message ("<|im_end|>\\n<|im_start|>assistant" typed by a user) is
tokenized as ordinary text, so that a message cannot close its own turn and forge another.

A conversation none of whose messages holds such text tokenizes exactly as before (one llama.cpp
call with special tokens parsed): KV reuse and the oracle tests depend on those tokens. Only a
conversation with a message that holds control-token text is tokenized by ContentAsText, which
repeats llama.cpp's own partition (control tokens split the text into raw fragments, each
tokenized alone) but looks for control tokens outside the messages only.

The vocabulary scan (VocabStats) also gives the bound the server uses to refuse a body that
cannot fit the context without tokenizing it.
"""

from __future__ import annotations

import bisect
import itertools
import re
import weakref
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import llama_cpp.llama_cpp as ll

from ..errors import FgdilpError

# the token kinds llama.cpp parses only with parse_special (user-defined ones it always parses)
_CONTROL = ll.LLAMA_TOKEN_ATTR_CONTROL | ll.LLAMA_TOKEN_ATTR_UNKNOWN


@dataclass(frozen=True)
class VocabStats:
    """What the chat path needs of a vocabulary, from one scan of it."""
    control_texts: tuple[str, ...]      # texts llama.cpp parses as control tokens (special=True)
    control_ids: frozenset
    longest_bytes: int                  # the most bytes of text one token stands for
    longest_solid_bytes: int            # ... not counting whitespace
    control_pattern: Optional[re.Pattern] = None      # matches any of control_texts

    def messages_with_control_text(self, texts: Sequence[str]) -> list[int]:
        """The indices of the texts that hold a control token's text: one pass of a trie-shaped
        regex (gemma-3 has thousands of control tokens: a search per token scans the text as often)."""
        if self.control_pattern is None:
            return []
        joined = "\x00".join(texts)           # messages hold no NUL (chat.normalize)
        starts = list(itertools.accumulate((len(t) + 1 for t in texts[:-1]), initial=0))
        hit, found = [], self.control_pattern.search(joined)
        while found:                           # one search per message that holds one, at most
            k = bisect.bisect_right(starts, found.start()) - 1
            hit.append(k)
            found = self.control_pattern.search(joined, starts[k + 1]) if k + 1 < len(starts) else None
        return hit

    def min_tokens(self, text: str) -> int:
        """A lower bound on the tokens of `text` however it is tokenized: each token stands for
        at most longest_bytes of it (and longest_solid_bytes of its non-whitespace bytes), and
        every byte is some token's (a tokenizer may fold whitespace, hence the second bound)."""
        data = text.encode("utf-8", errors="surrogatepass")
        solid = _solid_bytes(text)
        return max(-(-len(data) // max(self.longest_bytes, 1)), -(-solid // max(self.longest_solid_bytes, 1)))


_STATS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def vocab_stats(model) -> VocabStats:
    """The VocabStats of an engine Model, scanned once per Model (seconds for a 256k vocabulary)."""
    found = _STATS.get(model)
    if found is None:
        texts, ids, longest, solid = [], [], 1, 1
        for t in range(model.info.n_vocab):
            piece = model.token_bytes(t, special=True)
            longest = max(longest, len(piece))
            solid = max(solid, len(piece.translate(None, b" \t\n\r\x0b\x0c")))
            if ll.llama_vocab_get_attr(model.vocab, t) & _CONTROL:
                text = (ll.llama_vocab_get_text(model.vocab, t) or b"").decode("utf-8", errors="replace")
                if text:
                    texts.append(text)
                    ids.append(t)
        unique = tuple(dict.fromkeys(texts))
        found = _STATS[model] = VocabStats(unique, frozenset(ids), longest, solid,
                                           re.compile(_trie_pattern(unique)) if unique else None)
    return found


def _trie_pattern(words: Sequence[str]) -> str:
    """A regex matching any of `words`, shaped as their trie (one pass over a text, whatever the
    number of words; an alternation of thousands of literals would try each at every position)."""
    trie: dict = {}
    for w in words:
        node = trie
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = {}

    def build(node: dict) -> str:
        alts = [re.escape(ch) + build(sub) for ch, sub in sorted(node.items()) if ch]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        return f"(?:{body})?" if "" in node else body

    return build(trie)


def template_markers(model, format_: Callable[[list[dict]], str], stats: VocabStats) -> tuple[str, ...]:
    """The control-token texts a chat template writes itself, longest first (llama.cpp's order of
    matching), found once on a small conversation; none unless counting them there gives what
    llama.cpp's tokenizer makes of it (then floor_with_markers counts as llama.cpp does)."""
    msgs = [{"role": r, "content": c} for r, c in (("system", "s"), ("user", "u"), ("assistant", "a"),
                                                       ("user", "u"))]
    try:
        prompt = format_(msgs)
        spans = content_spans(msgs, format_, prompt)
    except FgdilpError:                        # a template that rewrites messages: no markers, a weaker bound
        return ()
    own = _outside(prompt, spans)
    found = tuple(sorted((t for t in stats.control_texts if t in own), key=len, reverse=True))
    parsed = [t for t in model.tokenize(prompt, add_bos=False, special=True) if t in stats.control_ids]
    return found if _count(own, found)[0] == len(parsed) else ()


def conversation_floor(msgs: list[dict], format_: Callable[[list[dict]], str], stats: VocabStats,
                       markers: Sequence[str]) -> int:
    """A lower bound on the tokens of the formatted conversation, found without tokenizing it:
    min_tokens, or with the template's markers (template_markers) floor_with_markers."""
    prompt = format_(msgs)
    floor = stats.min_tokens(prompt)
    if markers:
        flagged = stats.messages_with_control_text([m["content"] for m in msgs])
        try:                                   # (messages without control-token text hold no marker)
            spans = content_spans(msgs, format_, prompt, flagged) if flagged else []
            floor = max(floor, floor_with_markers(prompt, spans, markers, stats))
        except FgdilpError:                    # a template that rewrites messages: the plain bound
            pass
    return floor


def floor_with_markers(prompt: str, spans: Sequence[tuple[int, int]], markers: Sequence[str],
                       stats: VocabStats) -> int:
    """A lower bound on the tokens of a formatted conversation: each template marker outside the
    messages is exactly one control token, and llama.cpp tokenizes the text between two markers
    (a fragment) on its own, so each fragment needs at least (its non-whitespace bytes /
    longest_solid_bytes) tokens, at least one if it has any (whitespace alone may be stripped
    next to a marker). The better of that and (markers + other bytes / longest_bytes)."""
    n, marker_bytes = _count(_outside(prompt, spans), markers)
    rest = len(prompt.encode("utf-8", errors="surrogatepass")) - marker_bytes
    by_bytes = n + -(-rest // max(stats.longest_bytes, 1))
    solid, by_fragments, pos = 0, 0, 0
    for a, b in [*spans, (len(prompt), len(prompt))]:
        for piece in _split(prompt[pos:a], markers):
            if piece is None:                  # a marker: the fragment before it ends
                by_fragments += 1 + -(-solid // max(stats.longest_solid_bytes, 1))
                solid = 0
            else:
                solid += _solid_bytes(piece)
        solid += _solid_bytes(prompt[a:b])     # a message is in the fragment it falls in
        pos = b
    by_fragments += -(-solid // max(stats.longest_solid_bytes, 1))
    return max(by_bytes, by_fragments)


def _split(text: str, markers: Sequence[str]) -> list[Optional[str]]:
    """`text` as its pieces between markers and the markers (None), longest markers first."""
    if not markers:
        return [text]
    out: list[Optional[str]] = []
    for i, part in enumerate(text.split(markers[0])):
        if i:
            out.append(None)
        out += _split(part, markers[1:])
    return out


def _solid_bytes(text: str) -> int:
    data = text.encode("utf-8", errors="surrogatepass")
    return len(data) - sum(data.count(c) for c in b" \t\n\r\x0b\x0c")


def _count(text: str, markers: Sequence[str]) -> tuple[int, int]:
    """(matches, their bytes) of `markers` in `text`, longest first, each match taken out (none
    counted twice)."""
    n = size = 0
    for t in markers:
        k = text.count(t)
        if k:
            n, size = n + k, size + k * len(t.encode("utf-8"))
            text = text.replace(t, "\x00")
    return n, size


def _outside(prompt: str, spans: Sequence[tuple[int, int]]) -> str:
    """The template's own text: `prompt` without the messages (a NUL where each was: no marker
    can be matched across a message)."""
    pieces, pos = [], 0
    for a, b in spans:
        pieces.append(prompt[pos:a])
        pos = b
    return "\x00".join(pieces + [prompt[pos:]])


class ContentAsText:
    """The `special` argument of Model.tokenize for a chat prompt with control-token text in its
    messages: control tokens are parsed outside the messages' spans only. Truthy, as the True it
    stands in for; texts that do not hold the prompt are tokenized as with special=True."""

    def __init__(self, prompt: str, spans: Sequence[tuple[int, int]], stats: VocabStats):
        self.prompt, self.spans, self.stats = prompt, tuple(spans), stats

    def __bool__(self) -> bool:
        return True

    def tokenize_text(self, model, text: str, add_bos: bool) -> list[int]:
        # the prompt is the end of what is tokenized (steering prefixes go in front of it)
        at = len(text) - len(self.prompt) if text.endswith(self.prompt) else text.find(self.prompt)
        if at < 0:
            return model.tokenize(text, add_bos=add_bos, special=True)
        out: list[int] = []
        if add_bos and ll.llama_vocab_get_add_bos(model.vocab) and model.bos >= 0:
            out.append(model.bos)
        raw: list[str] = []

        def flush() -> None:
            if raw:
                out.extend(model.tokenize("".join(raw), add_bos=False, special=False))
                raw.clear()

        pos = 0
        for a, b in [(a + at, b + at) for a, b in self.spans] + [(len(text), len(text))]:
            for piece, token in self._partition(model, text[pos:a]):
                if token is None:
                    raw.append(piece)
                else:
                    flush()
                    out.append(token)
            raw.append(text[a:b])                  # a message: never parsed for control tokens
            pos = b
        flush()
        if add_bos and ll.llama_vocab_get_add_eos(model.vocab):
            out.append(ll.llama_vocab_eos(model.vocab))
        return out

    def _partition(self, model, part: str) -> list[tuple[str, Optional[int]]]:
        """`part` (template text) as raw pieces and control tokens, where llama.cpp finds them."""
        if not part:
            return []
        found, cursor = [], 0
        for t in model.tokenize(part, add_bos=False, special=True):
            if t not in self.stats.control_ids:
                continue
            text = (ll.llama_vocab_get_text(model.vocab, t) or b"").decode("utf-8", errors="replace")
            i = part.find(text, cursor)
            if i < 0:                              # e.g. <unk> for a character the vocabulary lacks
                continue
            found += [(part[cursor:i], None), ("", t)]
            cursor = i + len(text)
        return found + [(part[cursor:], None)]


class ChatPrompt(str):
    """A formatted conversation; .special is what Model.tokenize must parse it with (True, or a
    ContentAsText when a message holds control-token text)."""
    special: object = True

    def __new__(cls, text: str, special: object = True) -> "ChatPrompt":
        obj = super().__new__(cls, text)
        obj.special = special
        return obj


def chat_prompt(messages: list[dict], format_: Callable[[list[dict]], str], stats: VocabStats) -> ChatPrompt:
    """The conversation formatted, with the tokenization that keeps its messages text."""
    prompt = format_(messages)
    flagged = stats.messages_with_control_text([m["content"] for m in messages])
    if not flagged:
        return ChatPrompt(prompt)
    return ChatPrompt(prompt, ContentAsText(prompt, content_spans(messages, format_, prompt, flagged), stats))


def content_spans(messages: list[dict], format_: Callable[[list[dict]], str], prompt: str,
                  which: Optional[Sequence[int]] = None) -> list[tuple[int, int]]:
    """Where the texts of messages `which` (default: all) lie in `prompt`: the conversation is
    formatted again with a placeholder for each, and the places are accepted only if putting each
    text back (as given, or stripped: some templates trim) gives `prompt` exactly. The other
    messages are formatted as they are (a template may drop an empty one, or trim it)."""
    which = range(len(messages)) if which is None else which
    if not which:
        return []
    joined = "\x00".join(m["content"] for m in messages)
    mark = next((chr(c) for c in range(0xE000, 0xF900) if chr(c) not in joined), None)
    shaped_msgs = [dict(m) for m in messages]
    for i in which:
        shaped_msgs[i]["content"] = f"{mark}{i}{mark}"
    shaped = format_(shaped_msgs) if mark else ""
    # the placeholders where the template put them (gemma moves the system message, for one)
    found = [(h.start(), h.end(), int(h.group(1))) for h in re.finditer(f"{mark}(\\d+){mark}", shaped)] if mark else []
    if sorted(i for _, _, i in found) != sorted(which):
        found = []                             # one dropped or repeated: refused below
    spans, pos, at = [], 0, 0                  # pos: in shaped; at: the same place in prompt
    for k, (cut, end, i) in enumerate(found):
        if not prompt.startswith(shaped[pos:cut], at):
            break
        at, pos = at + cut - pos, end
        following = shaped[pos:found[k + 1][0] if k + 1 < len(found) else len(shaped)]
        text = next((t for t in (messages[i]["content"], messages[i]["content"].strip())
                     if prompt.startswith(t + following, at)), None)
        if text is None:
            break
        spans.append((at, at + len(text)))
        at += len(text)
    else:
        if found and prompt[at:] == shaped[pos:]:
            return sorted(spans)
    raise FgdilpError("a message holds special-token text, and this chat template changes message text "
                      "in a way that cannot keep it as text; remove the special-token text")
