"""A multi-byte character is never split: a piece goes out once its character is whole, and a
reply cut (max_tokens) inside one ends before it, never with U+FFFD; in the API, on the server,
streamed and not."""

import pytest

from fgdilp_cpp.api import Detoxifier
from fgdilp_cpp.serve.server import create_app
from server_helpers import DET_KW, MSGS, Served

BYTE = 3                     # the tiny vocabulary's <0x00> token (tests/tiny_model.py)
EURO = "€".encode()          # E2 82 AC


@pytest.fixture(scope="module")
def det(tiny_llama):
    with Detoxifier.from_file(str(tiny_llama[0]), **DET_KW) as d:
        yield d


def cut_inside_a_character(det, **kw):
    """(seed, n) where the reply's last token leaves a character incomplete, and its whole bytes."""
    for seed in range(400):
        for n in (2, 3, 4, 5):
            res = det.chat(MSGS, seed=seed, n_predict=n, temp=1.5, **kw)
            data = b"".join(det.model.token_bytes(t) for t in res.tokens)
            try:
                data.decode()
            except UnicodeDecodeError as exc:
                if exc.reason == "unexpected end of data":
                    return seed, n, data
    raise AssertionError("no reply of the tiny model ends inside a character")


def test_forced_bytes_come_out_as_whole_characters(det):
    a = det.model.tokenize("a", add_bos=False)
    lead = det.model.detokenize(a)                                  # " a": SentencePiece's space
    pieces = []
    res = det.generator.generate("hello", forced_tokens=a + [BYTE + b for b in EURO], on_text=pieces.append)
    assert res.text == lead + "€" and pieces == [lead, "€"]
    pieces.clear()
    res = det.generator.generate("hello", forced_tokens=a + [BYTE + b for b in EURO[:2]], on_text=pieces.append)
    assert res.text == lead and pieces == [lead]                    # the cut character is dropped
    res = det.generator.generate("hello", forced_tokens=a + [BYTE + 0xFF] + a)
    assert res.text == lead + "\ufffd" + lead                       # invalid bytes are still marked


def test_a_reply_cut_inside_a_character_in_the_api(det):
    seed, n, data = cut_inside_a_character(det)
    res = det.chat(MSGS, seed=seed, n_predict=n, temp=1.5)
    assert "\ufffd" not in res.text and res.text == data.decode(errors="ignore")
    stream = det.stream_chat(MSGS, seed=seed, n_predict=n, temp=1.5)
    pieces = list(stream)
    assert "".join(pieces) == res.text and not any("\ufffd" in p for p in pieces)


def test_a_reply_cut_inside_a_character_on_the_server(det):
    seed, n, data = cut_inside_a_character(det)
    want = data.decode(errors="ignore")
    with Served(create_app(det)) as srv:
        body = {"messages": MSGS, "seed": seed, "max_tokens": n, "temperature": 1.5}
        status, _, out = srv.request("POST", "/v1/chat/completions", body)
        assert status == 200 and out["choices"][0]["message"]["content"] == want
        assert out["choices"][0]["finish_reason"] == "length" and out["usage"]["completion_tokens"] == n
        pieces = []
        with srv.client() as c:
            for chunk in c.chat.completions.create(model="m", messages=MSGS, stream=True, max_tokens=n,
                                                   seed=seed, temperature=1.5):
                if chunk.choices and chunk.choices[0].delta.content:
                    pieces.append(chunk.choices[0].delta.content)
        assert "".join(pieces) == want and not any("\ufffd" in p for p in pieces)
