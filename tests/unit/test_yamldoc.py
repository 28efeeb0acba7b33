"""supervisor.config.yamldoc: locating values by field path, duplicate keys, and field names."""

from __future__ import annotations

import textwrap

import pytest

from supervisor.config.yamldoc import YamlDoc, YamlProblem, format_loc

TEXT = textwrap.dedent("""\
    # a comment
    profile: cpu-only
    daemon:
      instance: lab
      proxy_listen: ["127.0.0.1:8081", "[::1]:8081"]
    models:
      - name: a
        gguf: a.gguf
      - name: b
        aliases:
          - bee
          - beta
        gguf: b.gguf
        empty:
        after: 1
    """)


@pytest.fixture(scope="module")
def doc():
    return YamlDoc.parse(TEXT)


@pytest.mark.parametrize(
    "loc, line",
    [
        ((), 2),
        (("profile",), 2),
        (("daemon", "instance"), 4),
        (("daemon", "proxy_listen"), 5),
        (("daemon", "proxy_listen", 1), 5),
        (("models", 0), 7),
        (("models", 0, "gguf"), 8),
        (("models", 1, "name"), 9),
        (("models", 1, "aliases", 0), 11),
        (("models", 1, "aliases", 1), 12),
        (("models", 1, "gguf"), 13),
        (("models", 1, "empty"), 14),
        (("models", 1, "after"), 15),
        # the deepest part that exists
        (("models", 1, "missing"), 9),
        (("nope", "deeper"), 2),
        (("daemon", "instance", "below-a-scalar"), 4),
    ],
)
def test_line_of(doc, loc, line):
    assert doc.line_of(loc) == line


@pytest.mark.parametrize(
    "loc, line",
    [
        (("daemon",), 3),
        (("models",), 6),
        (("models", 1, "aliases"), 10),
    ],
)
def test_line_of_key_with_block_value_is_the_key_line(doc, loc, line):
    # An error about a whole block (unknown key, wrong type) must point at its key, not at the first line inside.
    assert doc.line_of(loc) == line


def test_parse_keeps_the_data(doc):
    assert doc.data["models"][1]["aliases"] == ["bee", "beta"]
    assert doc.data["models"][1]["empty"] is None
    assert doc.data["daemon"] == {"instance": "lab", "proxy_listen": ["127.0.0.1:8081", "[::1]:8081"]}


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_empty_document(text):
    doc = YamlDoc.parse(text)
    assert (doc.data, doc.root) == (None, None)
    assert doc.line_of(("models", 0)) is None


@pytest.mark.parametrize(
    "text, line, message",
    [
        ("a: 1\nb: 2\na: 3\n", 3, "duplicate key 'a' (first at line 1)"),
        ("m:\n  - x: 1\n    y: 2\n    x: 3\n", 4, "duplicate key 'x' (first at line 2)"),
        ("a: {k: 1, k: 2}\n", 1, "duplicate key 'k' (first at line 1)"),
        ("a: 1\n  b: 2\n", 2, "YAML syntax error: mapping values are not allowed here"),
        ("a: [1, 2\nb: 3\n", 2, "YAML syntax error: expected ',' or ']', but got ':'"),
    ],
)
def test_problems_carry_their_line(text, line, message):
    with pytest.raises(YamlProblem) as caught:
        YamlDoc.parse(text)
    assert (caught.value.line, caught.value.message) == (line, message)


def test_same_key_in_sibling_mappings_is_fine():
    doc = YamlDoc.parse("models:\n  - name: a\n  - name: b\n")
    assert doc.data == {"models": [{"name": "a"}, {"name": "b"}]}


@pytest.mark.parametrize(
    "loc, text",
    [
        ((), "(top level)"),
        (("profile",), "profile"),
        (("models", 1, "gguf"), "models[1].gguf"),
        (("models", 0, "aliases", 2), "models[0].aliases[2]"),
        (("daemon", "proxy_listen", 0, "port"), "daemon.proxy_listen[0].port"),
        ((0, "name"), "[0].name"),
    ],
)
def test_format_loc(loc, text):
    assert format_loc(loc) == text
