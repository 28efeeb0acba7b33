"""The Debian mirror of the integration tests' base image comes from the machine's apt sources.

Recorded examples of both formats (deb822 ``*.sources`` and one-line ``sources.list``), written to
tmp_path as an ``/etc/apt`` of its own; the example host names are reserved ones (RFC 2606).
"""

from __future__ import annotations

import pytest

from tests.integration import base_image
from tests.integration.base_image import AptSource, apt_mirror, apt_sources, parse_deb822_sources

# Debian 12's installer writes this shape (a snapshot comment above URIs: must stay a comment).
DEB822 = """\
Types: deb
# http://snapshot.example.org/archive/debian/20250520T000000Z
URIs: http://mirror.example.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
# http://snapshot.example.org/archive/debian-security/20250520T000000Z
URIs: http://mirror.example.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""

ONE_LINE = """\
# deb cdrom:[Debian GNU/Linux 12.5.0 _Bookworm_ - Official amd64 DVD Binary-1]/ bookworm contrib main

deb http://ftp.example.net/debian/ bookworm main non-free-firmware
deb-src http://ftp.example.net/debian/ bookworm main non-free-firmware

deb http://security.example.net/debian-security bookworm-security main non-free-firmware
deb [arch=amd64 signed-by=/usr/share/keyrings/docker.gpg] https://download.example.com/linux/debian bookworm stable
"""


def etc_apt(tmp_path, sources_list: str | None = None, **parts: str):
    """An /etc/apt in tmp_path: ``sources.list`` and ``sources.list.d/<name>`` (``debian_sources`` = debian.sources)."""
    (tmp_path / "sources.list.d").mkdir()
    if sources_list is not None:
        (tmp_path / "sources.list").write_text(sources_list)
    for name, text in parts.items():
        (tmp_path / "sources.list.d" / name.replace("_", ".")).write_text(text)
    return tmp_path


def test_deb822_sources_give_the_mirror_of_the_suite(tmp_path):
    etc = etc_apt(tmp_path, debian_sources=DEB822)
    origin = str(etc / "sources.list.d/debian.sources")
    assert apt_sources(etc) == [
        AptSource("http://mirror.example.org/debian", ("bookworm", "bookworm-updates"), origin),
        AptSource("http://mirror.example.org/debian-security", ("bookworm-security",), origin),
    ]
    assert apt_mirror("bookworm", etc) == "http://mirror.example.org/debian"


def test_one_line_sources_list_gives_the_mirror_of_the_suite(tmp_path):
    etc = etc_apt(tmp_path, ONE_LINE)
    origin = str(etc / "sources.list")
    assert apt_sources(etc) == [
        AptSource("http://ftp.example.net/debian/", ("bookworm",), origin),
        AptSource("http://security.example.net/debian-security", ("bookworm-security",), origin),
        AptSource("https://download.example.com/linux/debian", ("bookworm",), origin),
    ]
    assert apt_mirror("bookworm", etc) == "http://ftp.example.net/debian/"


def test_sources_list_comes_before_sources_list_d(tmp_path):
    other = "deb http://other.example.org/debian bookworm main\n"
    etc = etc_apt(tmp_path, ONE_LINE, debian_sources=DEB822, other_list=other)
    assert [source.uri for source in apt_sources(etc)][:4] == [
        "http://ftp.example.net/debian/",
        "http://security.example.net/debian-security",
        "https://download.example.com/linux/debian",
        "http://mirror.example.org/debian",
    ]
    assert apt_sources(etc)[-1].uri == "http://other.example.org/debian"  # *.list in sources.list.d too


def test_disabled_files_and_stanzas_and_source_only_entries_are_skipped(tmp_path):
    etc = etc_apt(
        tmp_path,
        "deb-src http://src.example.org/debian bookworm main\n",
        # What a host parks aside is no longer apt's: neither suffix counts.
        debian_sources_disabled=DEB822,
        nodesource_list_save="deb http://parked.example.org/debian bookworm main\n",
        a_sources="Types: deb\nURIs: http://off.example.org/debian\nSuites: bookworm\nEnabled: no\n\n"
        "Types: deb-src\nURIs: http://src.example.org/debian\nSuites: bookworm\n\n"
        "types: deb deb-src\nuris: http://on.example.org/debian\nsuites: bookworm\n",
    )
    assert [source.uri for source in apt_sources(etc)] == ["http://on.example.org/debian"]


def test_deb822_continuation_lines_and_several_uris():
    text = (
        "Types: deb\nURIs: http://one.example.org/debian\n  http://two.example.org/debian\n"
        "Suites:\n bookworm\n bookworm-updates\nComponents: main\n"
    )
    assert parse_deb822_sources(text, "x") == [
        AptSource("http://one.example.org/debian", ("bookworm", "bookworm-updates"), "x"),
        AptSource("http://two.example.org/debian", ("bookworm", "bookworm-updates"), "x"),
    ]


def test_another_release_falls_back_to_its_main_archive(tmp_path):
    trixie = DEB822.replace("bookworm", "trixie")
    etc = etc_apt(tmp_path, "deb cdrom:[Debian trixie]/ trixie main\n", debian_sources=trixie)
    # A cdrom: URI is nothing debootstrap fetches from; the security archive does not carry bookworm.
    assert apt_mirror("bookworm", etc) == "http://mirror.example.org/debian"


@pytest.mark.parametrize(
    "sources_list",
    [None, "", "# deb http://commented.example.org/debian bookworm main\n", "deb cdrom:[Debian 12]/ bookworm main\n"],
)
def test_no_mirror_configured_is_a_clear_error(tmp_path, sources_list):
    etc = etc_apt(tmp_path, sources_list)
    with pytest.raises(RuntimeError) as caught:
        apt_mirror("bookworm", etc)
    message = str(caught.value)
    assert message.startswith("no Debian mirror is configured for apt here")
    assert f"{etc}/sources.list.d/*.sources" in message and "set LOCALLLM_DEBIAN_MIRROR" in message


def test_the_environment_still_overrides_apt(monkeypatch, tmp_path):
    monkeypatch.setattr(base_image, "APT_ETC", etc_apt(tmp_path))  # no source at all
    monkeypatch.setenv("LOCALLLM_DEBIAN_MIRROR", "http://override.example.org/debian")
    assert base_image.mirror() == "http://override.example.org/debian"
    monkeypatch.delenv("LOCALLLM_DEBIAN_MIRROR")
    with pytest.raises(RuntimeError, match="no Debian mirror is configured"):
        base_image.mirror()
