"""The base64 measurement as a property: random MIME trees (random boundaries, nesting,
encodings, enclosed messages) measure exactly as a reference computed from the tree itself, in
any chunking; broken ones (junk lines, lines like an outer boundary, missing delimiters, cut
anywhere) never raise, never measure more than their raw size, and the walk's work counter stays
linear in the size and under its budget."""

from __future__ import annotations

import base64
from dataclasses import dataclass

import pytest
from conftest import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from ingress_plugins import max_message_size
from ingress_plugins.max_message_size import Base64Measure

ALPHABET = set(max_message_size.B64_ALPHABET)
TEXT_LINES = [b"hello", b"", b"-", b"--", b"---", b"-- signature", b"--not-a-boundary",
              b"From: x", b"a: b", b" folded", b"\xff\xfe 8-bit", b"x" * 1200, b"=3D=20"]


@dataclass
class Built:
    data: bytes
    saved: int  # raw bytes of base64 bodies minus their decoded size


def alphabet(data: bytes) -> int:
    return sum(1 for byte in data if byte in ALPHABET)


@st.composite
def text_body(draw) -> bytes:
    return b"".join(line + b"\r\n" for line in draw(st.lists(st.sampled_from(TEXT_LINES),
                                                             max_size=6)))


@st.composite
def base64_body(draw) -> bytes:
    payload = draw(st.binary(max_size=300))
    width = draw(st.sampled_from([4, 60, 76, 200]))
    encoded = base64.b64encode(payload)
    if draw(st.booleans()):
        encoded = encoded.rstrip(b"=")
    lines = [encoded[i:i + width] for i in range(0, len(encoded), width)]
    junk = draw(st.sampled_from([b"", b"!!", b" \t", b"#"]))  # garbage counts for nothing
    return b"".join(line + junk + b"\r\n" for line in lines)


def header(draw, ctype: bytes, encoding: bytes | None) -> bytes:
    name = draw(st.sampled_from([b"Content-Type", b"content-type", b"CONTENT-TYPE"]))
    lines = [b"X-Other: " + draw(st.sampled_from([b"1", b"boundary=zz", b"base64"])),
             name + b": " + ctype]
    if encoding is not None:
        cte = draw(st.sampled_from([b"Content-Transfer-Encoding", b"content-transfer-encoding"]))
        lines.append(cte + b": " + encoding)
    if draw(st.booleans()):
        lines.reverse()
    return b"".join(line + b"\r\n" for line in lines) + b"\r\n"


@st.composite
def leaf(draw, in_multipart: bool) -> Built:
    encoding = draw(st.sampled_from([None, b"7bit", b"quoted-printable", b"base64", b"BASE64"]))
    ctype = draw(st.sampled_from([b"text/plain", b"application/octet-stream", b"image/png"]))
    if encoding is not None and encoding.lower() == b"base64":
        body = draw(base64_body())
        trailer = 2 if in_multipart else 0  # the CRLF before the next delimiter line
        saved = len(body) + trailer - alphabet(body) * 3 // 4
    else:
        body, saved = draw(text_body()), 0
    return Built(header(draw, ctype, encoding) + body, saved)


@st.composite
def entity(draw, depth: int = 0, in_multipart: bool = False, used: tuple = ()) -> Built:
    kind = draw(st.sampled_from(["leaf", "multipart", "message"] if depth < 4 else ["leaf"]))
    if kind == "leaf":
        return draw(leaf(in_multipart))
    if kind == "message":
        inner = draw(entity(depth + 1, in_multipart, used))
        return Built(header(draw, b"message/rfc822", None) + inner.data, inner.saved)
    # Boundaries carry "=_", which no text line has, so a well-formed tree has no line that
    # could be taken for a delimiter.
    boundary = b"=_" + draw(st.text("abcXYZ019'()+_,-./:=?", min_size=1, max_size=12)
                            ).encode() + str(len(used)).encode()
    fold = draw(st.sampled_from([b"; ", b";\r\n\tcharset=x; ", b";\r\n "]))
    ctype = draw(st.sampled_from([b"multipart/mixed", b"multipart/alternative"])) + fold
    ctype += b'boundary="' + boundary + b'"'
    children = [draw(entity(depth + 1, True, (*used, boundary)))
                for _ in range(draw(st.integers(0, 3)))]
    padding = draw(st.sampled_from([b"", b" ", b"\t \t"]))
    body = draw(text_body())  # the preamble
    for child in children:
        body += b"--" + boundary + padding + b"\r\n" + child.data + b"\r\n"
    body += b"--" + boundary + b"--" + padding + b"\r\n" + draw(text_body())  # + epilogue
    return Built(header(draw, ctype, None) + body, sum(c.saved for c in children))


def measure(data: bytes, cuts: list[int]) -> Base64Measure:
    counter = Base64Measure()
    pos = 0
    for cut in cuts:
        counter.feed(data[pos:pos + cut])
        pos += cut
    counter.feed(data[pos:])
    counter.result = counter.finish()
    return counter


def work_bound(size: int) -> int:
    """Linear in the size (a header block costs HEADER_COST + 1 and needs at least one byte, a
    line at least one, a reopened multipart some 30) and capped by the budget."""
    cap = max_message_size.BUDGET + max_message_size.HEADER_COST + max_message_size.MAX_DEPTH
    return min(cap, (max_message_size.HEADER_COST + 2) * (size + 1))


CUTS = st.lists(st.integers(1, 3000), max_size=8)


@settings(max_examples=examples(300), deadline=None)
@given(tree=entity(), cuts=CUTS)
def test_well_formed_trees_measure_as_the_reference(tree, cuts):
    counter = measure(tree.data, cuts)
    assert counter.result == len(tree.data) - tree.saved
    assert counter.work <= work_bound(len(tree.data))


JUNK = [b"--", b"-", b"\r", b"x" * 2500, b"--=_", b"Content-Type: multipart/mixed; boundary=q",
        b"Content-Transfer-Encoding: base64", b"", b"AAAA", b"--q", b"--q--"]


@st.composite
def broken(draw) -> bytes:
    data = draw(entity()).data
    lines = data.split(b"\n")
    boundaries = [line.rstrip(b" \t\r") for line in lines if line.startswith(b"--=_")]
    junk = JUNK + [b + extra for b in boundaries for extra in (b"x", b"--x", b"", b"--")]
    for _ in range(draw(st.integers(0, 6))):
        at = draw(st.integers(0, len(lines)))
        action = draw(st.sampled_from(["insert", "delete", "bare-lf"]))
        if action == "insert":
            lines.insert(at, draw(st.sampled_from(junk)) + b"\r")
        elif lines and action == "delete":  # e.g. a delimiter goes missing
            del lines[min(at, len(lines) - 1)]
        elif lines:
            lines[min(at, len(lines) - 1)] = lines[min(at, len(lines) - 1)].rstrip(b"\r")
    data = b"\n".join(lines)
    return data[:draw(st.integers(0, len(data)))] if draw(st.booleans()) else data


@settings(max_examples=examples(300), deadline=None)
@given(data=broken(), cuts=CUTS)
def test_broken_mime_is_measured_within_bounds(data, cuts):
    counter = measure(data, cuts)
    assert 0 <= counter.result <= len(data)
    assert counter.result == measure(data, []).result  # the chunking does not matter
    assert counter.work <= work_bound(len(data))


def nested(depth: int) -> bytes:
    """*depth* nested multiparts, the innermost's first part about to start."""
    head = b"Content-Type: multipart/mixed; boundary=b0\r\n\r\n"
    for d in range(depth - 1):
        head += b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (d, d + 1)
    return head + b"--b%d\r\n" % (depth - 1)


B64_PART = b"Content-Transfer-Encoding: base64\r\n\r\n"


@pytest.mark.parametrize("depth,raw", [(64, False), (65, True), (200, True)])
def test_multiparts_deeper_than_max_depth_are_opaque(depth, raw):
    body = b"QUJD\r\n" * 1000
    data = nested(depth) + B64_PART + body
    expected = len(data) if raw else len(data) - len(body) + 3000
    assert measure(data, [1000] * (len(data) // 1000)).result == expected


@pytest.mark.parametrize("head,unit", [
    (B64_PART, b"--\r\n"),  # millions of lines that start like a delimiter
    (B64_PART, b"--b1x\r\n"),  # ... like an outer one
    (B64_PART, b"--b63\r\n\r\n"),  # empty parts of the innermost multipart
    (B64_PART, b"--b0\r\nContent-Type: multipart/mixed; boundary=b1\r\n\r\n"),  # reopening
    (b"", b"a: b\r\n"),  # an endless header block
])
def test_a_message_made_to_be_slow_stays_under_the_budget(head, unit):
    data = nested(64) + head + unit * (3_000_000 // len(unit)) + b"QUJD\r\n" * 10_000
    counter = measure(data, [1 << 16] * (len(data) >> 16))
    assert 0 <= counter.result <= len(data)
    assert max_message_size.BUDGET < counter.work <= work_bound(len(data))
    assert counter.result == measure(data, [777] * 100).result
