"""microbroker.uci against OpenWrt's real libuci (`uci -N export`): the
shipped configs and a generated corpus of tricky files. Every file libuci
accepts gives the same sections, options and lists in the same order;
every file it refuses is refused, with a line number."""

import os
import random
import re
import subprocess

import pytest

import owrt
from microbroker import uci

pytestmark = owrt.need("uci")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_CORPUS = 1500


def export(tmp_path, data):
    """`uci -c DIR -N export p`: (sections, error): sections as
    [(type, name, [(kind, name, value)])], error as (line, reason)."""
    d = tmp_path / "uci"
    d.mkdir(exist_ok=True)
    (d / "p").write_bytes(data)
    r = subprocess.run([owrt.path("uci"), "-c", str(d), "-N", "export", "p"],
                       capture_output=True, timeout=30)
    if r.returncode:
        m = re.search(rb"Parse error \((.*)\) at line (\d+)", r.stderr)
        assert m, r.stderr
        return None, (int(m.group(2)), m.group(1).decode())
    return read_export(r.stdout), None


def read_export(out):
    """uci_export_package's output (file.c): `config TYPE ['NAME']`, then
    `\\toption|list NAME 'VALUE'` with ' written as '\\''."""
    secs, i = [], 0
    assert out.startswith(b"package p\n"), out[:40]
    i = len(b"package p\n")
    while i < len(out):
        if out[i:i + 1] == b"\n":
            i += 1
            continue
        if out.startswith(b"config ", i):
            j = out.index(b"\n", i)
            words = out[i + 7:j].split(b" ", 1)
            name = words[1][1:-1] if len(words) > 1 else b""
            secs.append((words[0], name, []))
            i = j + 1
            continue
        assert out.startswith(b"\t", i), out[i:i + 40]
        kind, _, rest = out[i + 1:i + 8].partition(b" ")
        i += 1 + len(kind) + 1
        j = out.index(b" ", i)
        name = out[i:j]
        i = j + 1
        assert out[i:i + 1] == b"'"
        i += 1
        val = bytearray()
        while True:
            if out.startswith(b"'\\''", i):
                val += b"'"
                i += 4
            elif out[i:i + 1] == b"'":
                i += 1
                break
            else:
                val += out[i:i + 1]
                i += 1
        assert out[i:i + 1] == b"\n"
        i += 1
        secs[-1][2].append((kind, name, bytes(val)))
    return secs


def ours(data):
    """microbroker.uci's reading in the same shape."""
    sections, problems = uci.parse(data)
    if problems:
        return None, problems[0]
    out = []
    for s in sections:
        opts = []
        for key, (value, _) in s.options.items():
            if isinstance(value, list):
                opts += [(b"list", key, v) for v, _ in value]
            else:
                opts.append((b"option", key, value))
        out.append((s.type, s.name, opts))
    return out, None


def same(tmp_path, data):
    theirs, err = export(tmp_path, data)
    mine, problem = ours(data)
    if err is not None:
        assert problem is not None, (data, err, mine)
        assert problem[0] >= 1
        return "refused"
    assert problem is None, (data, problem)
    assert mine == theirs, data
    return "accepted"


@pytest.mark.parametrize("name", ["microbroker.config",
                                  "microbroker-client.config"])
def test_shipped_configs(tmp_path, name):
    with open(os.path.join(ROOT, "openwrt", name), "rb") as f:
        assert same(tmp_path, f.read()) == "accepted"


CASES = [
    b"config a 'x'\n\toption v \"it's\"\n\tlist l 'a b'\n\tlist l \"c\nd\"\n",
    b"config b\n\toption k v;junk\n\toption e ''\n\tlist m ''\n",
    b"config b\n\toption q 'a'\n\toption q ''\n\toption q\n",
    b"config b\n\toption z 'a'; option y b\n",
    b"config b\n\toption z a ; option y b\n",
    b"config b\n\toption z a\\;b; option y b\n",
    b"config\n", b"config", b"config x", b"c x\no a b\nl c d\n",
    b"config my-type 'x'\n\toption a b\n", b"config a.b\n", b"config a 'b-c'\n",
    b"option a b\n", b"config a\noption a b c\n", b"config a\noption\n",
    b"config a\r\n\toption b 'c'\r\n", b"config a\n\toption b c\r\n",
    b"config a 'x'\nconfig b 'x'\n", b"config a 'x'\noption p 1\n"
    b"config a 'x'\noption q 2\n",
    b"config a\n\toption b \"x\\\"y\\\\z\\n\"\n",
    b"config a\n\toption b x\\\ny\n", b"config a\n\toption b x\\\n  y\n",
    b"config a\n\toption b 'x\n", b"config a\n\toption b \"x\n",
    b"config a\n\toption b 'x' # c\n", b"config a # comment\n#x\n  # y\n",
    b"config a\n\toption b x#y\n", b"config a\n\toption b '\xff\xfe'\n",
    b"config a\n\toption b " + b"x" * 5000 + b"\n",
    b"config a\n\toption b 'no final newline'",
    b"config a\n\toption b 'x'\n\tlist b 'y'\n\toption b 'z'\n",
    b"package p\nconfig a\n", b"package p-q\nconfig a\n", b"package\n",
    b"config a\n\toption b \"\"\n", b"config a\n\tlist b\n",
    b"config a\n\toption b 'x''y'\"z\"w\n", b"\tconfig\ta\t'n'\n",
    b"config a\n\toption b\t'x'\t\n", b"config a;option b c\n",
    b"config a 'n';option b c\n", b"config a\n\toption b\\\n c\n",
    b"configx a\n", b"opt a b\n", b"config a\n\toption b-c d\n",
    b"config a\n\toption b c\v\n", b"config a\n\toption b \x01\n",
    b";\n", b"config a\n;;\n", b"config a\n\toption b ;\n",
]


@pytest.mark.parametrize("data", CASES)
def test_cases(tmp_path, data):
    same(tmp_path, data)


PIECES = [b"config", b"c", b"option", b"o", b"list", b"l", b"package",
          b"conf", b"service", b"my-type", b"a.b", b"x", b"'n'", b"'a b'",
          b"\"q\\\"x\"", b"'it'\\''s'", b"''", b"\"\"", b";", b"#c", b"# c",
          b"\\", b"\\\n", b"\\\r\n", b"\t", b" ", b"  ", b"\n", b"\r\n",
          b"\n", b"\n", b"a;b", b"v", b"1", b"'x\ny'", b"\"x\ny\"", b"\xff",
          b"\xc3\xa9", b"-", b"_", b"@b[0]", b"'", b"\"", b"\v", b"\x01",
          b"y" * 300]


VALUES = [b"v", b"'a b'", b"\"q\\\"x\"", b"'it'\\''s'", b"''", b"\"\"", b"a;b",
          b"'a';", b"a;", b"'x\ny'", b"\"x\ny\"", b"'\xff'", b"\xc3\xa9",
          b"x\\\ny", b"x\\\n y", b"'a'b\"c\"", b"#c", b"v #c", b"\\;",
          b"'\t'", b"y" * 3000, b"'@b[0]'", b"1", b"a\\ b"]


def generated(seed, n):
    """Files of mostly well-formed statements with tricky values, some
    junk mixed in."""
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rnd.randint(1, 10)):
            r = rnd.random()
            if r < 0.25 or not parts:
                parts.append(b"config " + rnd.choice(
                    [b"a", b"service", b"my-type", b"a.b", b"x"]) +
                    rnd.choice([b"", b" 'n'", b" m", b" 'n'", b" 'b-c'"]))
            elif r < 0.96:
                parts.append(rnd.choice([b"\toption ", b"\tlist ", b"o ",
                                         b"  l "]) +
                             rnd.choice([b"k", b"a", b"s", b"b-c"]) +
                             rnd.choice([b" ", b"\t", b"  "]) +
                             rnd.choice(VALUES))
            else:
                parts.append(rnd.choice(PIECES))
            parts.append(rnd.choice([b"\n"] * 6 + [b"; ", b";", b" # c\n",
                                                    b"\r\n", b" \n"]))
        data = b"".join(parts)
        if rnd.random() < 0.1:
            data = data.replace(b"\n", b"\r\n")
        if rnd.random() < 0.2:
            data = data.rstrip(b"\n")
        out.append(data)
    return out


def test_generated_corpus(tmp_path):
    seen = {"accepted": 0, "refused": 0}
    for data in generated(13, N_CORPUS):
        seen[same(tmp_path, data)] += 1
    # both sides of the line are exercised
    assert seen["accepted"] > N_CORPUS // 5 and \
        seen["refused"] > N_CORPUS // 5, seen
