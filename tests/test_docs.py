"""The docs stay true: what README.md and docs/*.md name must exist in the code.

Checked against the code itself, not a copy of it:

- every ``streamlme <command> --option`` in a code span or block is a click command with that
  option; an option span in a table row that names a command belongs to that command; any other
  option span belongs to some command;
- every configuration key (``[section] key``, ``section.key``, TOML blocks, including commented
  ``# key = ...`` lines, and ``STREAMLME_<SECTION>_<KEY>`` variables) is in the config schema,
  and every key of the schema is mentioned somewhere;
- every ``METHOD /path`` and curl URL answers on the FastAPI app (not 404 "Not Found", not 405),
  every route of the app is in docs/api.md, and its auth column tells the truth;
- every ``streamlme_*`` metric name is one `streamlme.metrics` exports, and each is documented;
- every relative link resolves, anchors included.

Prose is free: only code spans, code blocks, tables and links are parsed.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from prometheus_client.metrics import MetricWrapperBase

from streamlme import metrics
from streamlme.cli import main
from streamlme.config import _SECTIONS, KafkaConfig

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^[ \t]*(```|~~~)[ \t]*([\w+-]*)[^\n]*\n(.*?)^[ \t]*\1[ \t]*$", re.S | re.M)
_SPAN = re.compile(r"(`+)(.+?)\1")


@dataclass
class Doc:
    path: Path
    text: str

    @property
    def name(self) -> str:
        return str(self.path.relative_to(ROOT))

    def blocks(self) -> Iterator[tuple[str, str]]:
        """(language, text) of fenced blocks, and ("", line) of 4-space indented code lines."""
        for m in _FENCE.finditer(self.text):
            yield m[2].lower(), m[3]
        for line in _FENCE.sub("", self.text).splitlines():
            if line.startswith(("    ", "\t")) and not line.lstrip().startswith(("-", "*", "|")):
                yield "", line

    def prose(self) -> str:
        """The text without fenced blocks."""
        return _FENCE.sub("", self.text)

    def spans(self) -> list[str]:
        return [m[2].strip() for m in _SPAN.finditer(self.prose())]

    def code(self) -> list[str]:
        """Every piece of code: block lines (backslash continuations joined) and spans."""
        out = []
        for _, block in self.blocks():
            out += re.sub(r"\\\n\s*", " ", block).splitlines()
        return out + self.spans()


def docs() -> list[Doc]:
    return [Doc(p, p.read_text(encoding="utf-8")) for p in DOCS]


# -- the CLI ---------------------------------------------------------------------------------

_COMMAND = re.compile(r"(?<![\w.-])(?<!from )(?<!import )streamlme[ \t]+([^`\n]*)")
_OPTION = re.compile(r"^[\[(]*(-{1,2}[A-Za-z][\w-]*)")


def _options(cmd: click.Command) -> set[str]:
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")} | {
        "--help"}


def _resolve(words: list[str]) -> tuple[click.Command, list[str], str | None]:
    """The command the words name, the words after it, and an error if a name is unknown."""
    cmd: click.Command = main
    path = "streamlme"
    while isinstance(cmd, click.Group) and words and re.fullmatch(r"[a-z][a-z-]*", words[0]):
        if words[0] not in cmd.commands:
            return cmd, words, f"`{path} {words[0]}` is not a command"
        cmd, words, path = cmd.commands[words[0]], words[1:], f"{path} {words[0]}"
    return cmd, words, None


def _command_uses(doc: Doc) -> Iterator[tuple[str, click.Command, list[str], str | None]]:
    for code in doc.code():
        for m in _COMMAND.finditer(code):
            rest = re.split(r"\s(?:\||#|;|&&|>|2>)\s|\s#|\)", m[1])[0]
            words = rest.split()
            if words:
                yield m[0].strip(), *_resolve(words)


def _option_words(words: list[str]) -> list[str]:
    out = []
    for w in words:
        m = _OPTION.match(w)
        if m:
            out.append(m[1].split("=")[0])
    return out


ALL_OPTIONS: set[str] = set()


def _walk(cmd: click.Command, path: str = "streamlme") -> Iterator[tuple[str, click.Command]]:
    """Every command and group under ``cmd``, with its full name ("streamlme config check")."""
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            yield from _walk(sub, f"{path} {name}")


for _, _cmd in _walk(main):
    ALL_OPTIONS |= _options(_cmd)


@pytest.mark.parametrize("doc", docs(), ids=lambda d: d.name)
def test_commands_and_options_exist(doc: Doc) -> None:
    problems = []
    for text, cmd, rest, error in _command_uses(doc):
        if error:
            problems.append(f"{text!r}: {error}")
            continue
        for opt in _option_words(rest):
            if opt not in _options(cmd):
                problems.append(f"{text!r}: `streamlme {cmd.name}` has no option {opt}")
    assert not problems, f"{doc.name}:\n" + "\n".join(problems)


@pytest.mark.parametrize("doc", docs(), ids=lambda d: d.name)
def test_option_spans_belong_to_their_command(doc: Doc) -> None:
    problems = []
    for line in doc.prose().splitlines():
        spans = [m[2].strip() for m in _SPAN.finditer(line)]
        options = [s.split()[0] for s in spans if _OPTION.fullmatch(s.split()[0] if s else "")]
        if not options:
            continue
        owner = None
        if line.lstrip().startswith("|"):
            first_cell = line.strip().strip("|").split("|")[0]
            m = _COMMAND.search(first_cell)
            if m:
                owner, _, error = _resolve(m[1].replace("`", "").split())
                assert error is None, f"{doc.name}: {line!r}: {error}"
        for opt in options:
            known = _options(owner) if owner is not None else ALL_OPTIONS
            if opt not in known:
                where = f"`streamlme {owner.name}`" if owner is not None else "any command"
                problems.append(f"{opt} is not an option of {where}: {line.strip()[:100]!r}")
    assert not problems, f"{doc.name}:\n" + "\n".join(problems)


def test_every_command_is_in_the_api_reference() -> None:
    api = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    for name, cmd in _walk(main):
        if isinstance(cmd, click.Group):
            continue
        assert f"`{name} " in api or f"`{name}`" in api, f"`{name}` is not in docs/api.md"


# -- configuration ---------------------------------------------------------------------------

_FIELDS = {name: set(cls.__struct_fields__) for name, cls in _SECTIONS.items()}
_FILE_SUFFIXES = {"yaml", "yml", "md", "py", "toml", "json", "npz", "jsonl", "csv", "lua"}


def _key_problem(section: str, key: str | None) -> str | None:
    if section == "kafka.client":
        return None  # any kafka-python setting; `config check` verifies those by name
    if section == "model.levels":
        # keys are the model's categorical columns, whatever they are named
        return None if "levels" in _FIELDS["model"] else "[model] has no levels table"
    if section not in _FIELDS:
        return f"[{section}] is not a configuration section"
    if key is not None and key not in _FIELDS[section]:
        return f"[{section}] has no key {key!r}"
    return None


def _config_mentions(doc: Doc) -> Iterator[tuple[str, str, str | None]]:
    for lang, block in doc.blocks():
        if lang != "toml":
            continue
        section = None
        for line in block.splitlines():
            head = re.match(r"\s*\[([\w.]+)\]", line)
            if head:
                section = head[1]
                yield line, section, None
                continue
            key = re.match(r"\s*#?\s*([a-z_]+)\s*=", line)
            if key and section:
                yield line, section, key[1]
    for span in doc.spans():
        m = re.match(r"\[([a-z.]+)\](?:\s+([a-z_]+))?", span)
        if m and not span.startswith("[--"):
            yield span, m[1], m[2]
        m = re.fullmatch(r"(model|kafka|redis|refresh|api|store)\.([a-z_]+)(\.[a-z_]+)?", span)
        if m and m[2] not in _FILE_SUFFIXES:
            yield span, m[1] if m[2] != "client" else "kafka.client", None if m[3] else m[2]
    for m in re.finditer(r"\bSTREAMLME_([A-Z0-9_]*[A-Z0-9])\b", doc.text):
        section, _, key = m[1].lower().partition("_")
        if section not in _FIELDS and not difflib.get_close_matches(section, _FIELDS, cutoff=0.75):
            continue  # not a configuration variable, as the loader sees it (STREAMLME_DEBUG, ...)
        if not key:
            if section in ("kafka", "redis"):
                continue  # STREAMLME_KAFKA / STREAMLME_REDIS point the tests at servers
            yield m[0], section, None
        elif section == "kafka" and key.startswith("client_"):
            continue
        else:
            yield m[0], section, key


@pytest.mark.parametrize("doc", docs(), ids=lambda d: d.name)
def test_config_keys_exist(doc: Doc) -> None:
    problems = [f"{text!r}: {p}" for text, section, key in _config_mentions(doc)
                if (p := _key_problem(section, key))]
    assert not problems, f"{doc.name}:\n" + "\n".join(problems)


def test_every_config_key_is_documented() -> None:
    text = "\n".join(d.text for d in docs())
    missing = [f"{section}.{key}" for section, keys in _FIELDS.items() for key in sorted(keys)
               if not re.search(rf"\b{key}\b", text)]
    assert not missing, f"configuration keys no doc mentions: {missing}"


def test_config_mentions_are_found() -> None:
    """The parser sees the README's configuration block (else the checks above prove nothing)."""
    readme = Doc(ROOT / "README.md", (ROOT / "README.md").read_text(encoding="utf-8"))
    found = {(s, k) for _, s, k in _config_mentions(readme)}
    assert {("model", "response"), ("kafka", "topic"), ("redis", "namespace")} <= found
    assert ("kafka", "nonexistent_key") not in found
    assert _key_problem("kafka", "bootstrap_server") is not None  # a renamed key is caught
    assert _key_problem("kafka", "max_message_bytes") is None
    assert set(KafkaConfig.__struct_fields__) == _FIELDS["kafka"]


# -- HTTP routes -----------------------------------------------------------------------------

_ROUTE = re.compile(r"\b(GET|POST|PUT|PATCH|DELETE)\s+(/[^\s`|,;)\"']*)")
_CURL_URL = re.compile(r"(?:\$API|https?://(?:127\.0\.0\.1|localhost)(?::\d+)?)(/[^\s\"'`]*)")


@pytest.fixture(scope="module")
def http():
    from fastapi.testclient import TestClient

    from streamlme.api.app import build_app
    from streamlme.client import Client
    from streamlme.store import MemoryStore

    with TestClient(build_app(Client(MemoryStore()), token=None)) as free, \
            TestClient(build_app(Client(MemoryStore()), token="s3cret")) as guarded:
        yield free, guarded


def _route_mentions(doc: Doc) -> Iterator[tuple[str, str]]:
    for m in _ROUTE.finditer(doc.text):
        yield m[1], m[2]
    for line in doc.code():
        if not line.lstrip().startswith("curl"):
            continue
        method = re.search(r"-X\s+(\w+)", line)
        verb = method[1] if method else ("POST" if re.search(r"\s(-d|--data)\b", line) else "GET")
        for m in _CURL_URL.finditer(line):
            yield verb, m[1]


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]*\}", "A17", path.replace("\\|", "|"))


def _exists(client, method: str, path: str) -> bool:
    r = client.request(method, _concrete(path), json={} if method != "GET" else None)
    if r.status_code == 405:
        return False
    return not (r.status_code == 404 and r.json().get("message") == "Not Found")


@pytest.mark.parametrize("doc", docs(), ids=lambda d: d.name)
def test_routes_exist(doc: Doc, http) -> None:
    free, _ = http
    missing = sorted({f"{m} {p}" for m, p in _route_mentions(doc) if not _exists(free, m, p)})
    assert not missing, f"{doc.name} names routes the app does not serve: {missing}"


def test_route_checks_can_fail(http) -> None:
    free, _ = http
    assert _exists(free, "GET", "/v1/groups/{group}/effect")
    assert not _exists(free, "GET", "/v1/group/{group}/effect")
    assert not _exists(free, "GET", "/v1/predict")


def test_every_route_is_in_the_api_reference_with_its_auth(http) -> None:
    from streamlme.api.app import build_app
    from streamlme.client import Client
    from streamlme.store import MemoryStore

    api = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    documented = {}
    for m in re.finditer(r"^\|\s*`(GET|POST) ([^`]+)`\s*\|\s*(\w+)\s*\|", api, re.M):
        documented[(m[1], m[2])] = m[3]
    schema = build_app(Client(MemoryStore())).openapi()
    served = {(verb.upper(), path) for path, ops in schema["paths"].items() for verb in ops}
    served |= {("GET", "/openapi.json"), ("GET", "/docs")}
    missing = sorted(served - set(documented))
    assert not missing, f"routes missing from the table in docs/api.md: {missing}"
    _, guarded = http
    for (method, path), auth in documented.items():
        r = guarded.request(method, _concrete(path), json={} if method == "POST" else None)
        needs_token = r.status_code == 401
        assert needs_token == (auth == "token"), f"{method} {path}: documented auth {auth!r}"


# -- metrics ---------------------------------------------------------------------------------

_SUFFIXES = {"counter": ("", "_total", "_created"), "gauge": ("",),
             "histogram": ("", "_bucket", "_sum", "_count", "_created")}


def _metric_names() -> dict[str, str]:
    """Every exposed sample name -> its metric's base name."""
    out = {}
    for obj in vars(metrics).values():
        if isinstance(obj, MetricWrapperBase):
            for suffix in _SUFFIXES[obj._type]:
                out[obj._name + suffix] = obj._name
    return out


@pytest.mark.parametrize("doc", docs(), ids=lambda d: d.name)
def test_metric_names_exist(doc: Doc) -> None:
    names = _metric_names()
    unknown = sorted({m for m in re.findall(r"\bstreamlme_[a-z_]+[a-z]\b", doc.text)
                      if m not in names})
    assert not unknown, f"{doc.name} names metrics streamlme/metrics.py does not define: {unknown}"


def test_every_metric_is_documented() -> None:
    ops = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    mentioned = {_metric_names().get(m) for m in re.findall(r"\bstreamlme_[a-z_]+[a-z]\b", ops)}
    missing = sorted(set(_metric_names().values()) - mentioned)
    assert not missing, f"metrics docs/operations.md does not describe: {missing}"


# -- links -----------------------------------------------------------------------------------

_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def anchors(text: str) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens, -1 for repeats.

    >>> sorted(anchors("# A `Client` (contract)\\n## Tests\\n## Tests"))
    ['a-client-contract', 'tests', 'tests-1']
    """
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", _FENCE.sub("", text), re.M):
        slug = re.sub(r"[^\w\- ]", "", m[1].lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


@pytest.mark.parametrize("doc", docs(), ids=lambda d: d.name)
def test_relative_links_resolve(doc: Doc) -> None:
    problems = []
    for m in _LINK.finditer(re.sub(r"`[^`\n]*`", "", doc.prose())):
        target = m[1]
        if re.match(r"[a-z][a-z+.-]*:", target):
            continue  # http(s), mailto: not ours to check offline
        file, _, anchor = target.partition("#")
        path = (doc.path.parent / file).resolve() if file else doc.path
        if not path.exists():
            problems.append(f"{target}: {path} does not exist")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path.read_text("utf-8")):
            problems.append(f"{target}: no heading #{anchor} in {path.name}")
    assert not problems, f"{doc.name}:\n" + "\n".join(problems)


def test_docs_exist_and_are_indexed() -> None:
    index = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    for page in ("operations.md", "api.md", "mathematics.md"):
        assert (ROOT / "docs" / page).exists(), page
        assert f"]({page})" in index, f"docs/README.md does not link {page}"
