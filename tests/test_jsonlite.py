"""jsonlite against the json module: the same bytes out, the same values in."""

import json
import os
import random
import subprocess
import sys

import pytest

from microbroker import jsonlite

@pytest.fixture(autouse=True, scope="module")
def both_paths():
    """jsonlite._dumps/_loads are ours; dumps/loads, after load_json(),
    json's (as in serve)."""
    jsonlite.load_json()
    yield
    jsonlite._encode = jsonlite._json = None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STRINGS = ["", "plain", "fc00::1", 'quo"te', "back\\slash", "tab\there", "nl\nx", "\x00\x1f",
           "\x7f", "é", "\u2028", "日本", "\U0001f600", "a, b", '", "', "}]", "\ud800"]


def random_value(rng, depth=0):
    pick = rng.randrange(9 if depth < 3 else 6)
    if pick == 0:
        return None
    if pick == 1:
        return rng.random() < 0.5
    if pick == 2:
        return rng.choice([0, -1, 7, 2 ** 40, -2 ** 70, rng.randrange(-10 ** 9, 10 ** 9)])
    if pick == 3:
        return rng.choice([0.0, -0.0, 1.5, 1e-7, 1e22, 1764328000.123456, -2.5e-300,
                           rng.uniform(-1e6, 1e6)])
    if pick in (4, 5):
        return rng.choice(STRINGS) + rng.choice(["", "x", " "])
    if pick == 6:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if pick == 7:
        return tuple(random_value(rng, depth + 1) for _ in range(rng.randrange(3)))
    return {rng.choice(STRINGS) + str(i): random_value(rng, depth + 1)
            for i in range(rng.randrange(4))}


def same(a, b):
    """Equal with the same types throughout (1 and 1.0 and True differ)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return repr(a) == repr(b)
    return a == b


def test_dumps_writes_what_json_writes():
    """Ours (_dumps), and dumps where json is loaded (json's encoder)."""
    rng = random.Random(7)
    for _ in range(3000):
        v = random_value(rng)
        want = json.dumps(v, separators=(",", ":"))
        assert jsonlite._dumps(v) == want, v
        assert jsonlite.dumps(v) == want, v


def test_without_load_json_both_are_ours_and_agree_with_json():
    """A CGI never imports json: dumps and loads are jsonlite's own there,
    and give what json gives; after load_json() (serve), json's, the same."""
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from microbroker import jsonlite\n"
            "v = {'a': [1, 2.5, None, True, 'x\\u00e9\\n'], 'b': {'c': float('nan')}}\n"
            "out = jsonlite.dumps(v)\n"
            "back = jsonlite.loads('{\"a\":[1,2.5,null,true,\"plain\"],\"n\":-3}')\n"
            "assert 'json' not in sys.modules, 'json was imported'\n"
            "import json\n"
            "assert jsonlite._encode is None and jsonlite._json is None\n"
            "assert out == json.dumps({'a': v['a'], 'b': {'c': None}}, separators=(',', ':')), out\n"
            "assert back == json.loads('{\"a\":[1,2.5,null,true,\"plain\"],\"n\":-3}')\n"
            "jsonlite.load_json()\n"
            "assert jsonlite._encode is not None and jsonlite._json is json\n"
            "assert jsonlite.dumps(v) == out\n"
            "print('ok')" % ROOT)
    r = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "ok\n", r.stderr


def test_loads_reads_what_json_reads():
    rng = random.Random(8)
    mine = [0]
    for _ in range(3000):
        v = random_value(rng)
        for text in (json.dumps(v), json.dumps(v, separators=(",", ":")),
                     json.dumps(v, indent=1, ensure_ascii=False)):
            assert same(jsonlite.loads(text), json.loads(text)), text
            assert same(jsonlite._loads(text), json.loads(text)), text
            if "\\" not in text and text.replace("\n", "").isprintable():
                # read here, not handed on to json
                direct, end = jsonlite._value(text, jsonlite._skip(text, 0))
                assert same(direct, json.loads(text)) and jsonlite._skip(text, end) == len(text)
                mine[0] += 1
            try:
                raw = text.encode()
            except UnicodeEncodeError:      # a lone surrogate has no UTF-8
                continue
            assert same(jsonlite.loads(raw), json.loads(raw)), raw
            assert same(jsonlite._loads(raw), json.loads(raw)), raw
    assert mine[0] > 3000


@pytest.mark.parametrize("text", [
    "", " ", "[1,]", '{"a":1,}', "{1:2}", '{"a" 1}', "[1 2]", "01", "-", "1.", ".5", "1e",
    "+1", "1e+", "nul", "truex", "[true false]", '"\x01"', '"a', "NaN", "-Infinity", "[",
    '{"a":', "\ufeff1", "1 1", '"\\x"', "[" * 5000 + "]" * 5000])
def test_bad_or_odd_input_is_judged_as_json_judges_it(text):
    try:
        want = ("ok", json.loads(text))
    except (ValueError, RecursionError) as e:
        want = ("error", type(e))
    for loads in (jsonlite._loads, jsonlite.loads):
        try:
            got = ("ok", loads(text))
        except (ValueError, RecursionError) as e:
            got = ("error", type(e))
        if want[0] == "ok" and got[0] == "ok":
            assert same(got[1], want[1]) or (want[1] != want[1] and got[1] != got[1])
        else:
            assert got == want


def test_small_records_are_read_without_the_json_module():
    code = ("import sys; sys.path.insert(0, %r); from microbroker import jsonlite; "
            "v = jsonlite.loads(b'{\"layout\": {\"b00\": 512}, \"schema\": 1, \"t\": 1.5}'); "
            "r = jsonlite.loads('[\"ab\",null,true,-3,[]]'); "
            "jsonlite.dumps([v, r]); print('json' in sys.modules, 're' in sys.modules)"
            % ROOT)
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_nan_and_infinity_are_written_as_null():
    for dumps in (jsonlite._dumps, jsonlite.dumps):
        assert dumps([float("nan"), float("inf"), -float("inf")]) == "[null,null,null]"


def test_dict_keys_as_json_writes_them():
    class S(str):
        def __str__(self):
            return "other"

    class I(int):
        def __repr__(self):
            return "other"

    d = {S("s"): 1, True: 2, None: 3, 4: 4, I(5): 5, 1.5: 6, float("nan"): 7,
         float("-inf"): 8}
    for dumps in (jsonlite._dumps, jsonlite.dumps):
        assert dumps(d) == json.dumps(d, separators=(",", ":"))
    for bad in ({(1, 2): 0}, {b"x": 0}):
        with pytest.raises(TypeError):
            json.dumps(bad)
        for dumps in (jsonlite._dumps, jsonlite.dumps):
            with pytest.raises(TypeError):
                dumps(bad)


@pytest.mark.parametrize("text", [
    '{"a":1}', '{"a:1":2}', '{"fc00::1":3,"b":0}', '{"a":"1:2"}', '{"x":1,"y}":2}',
    '{"x,":1}', '{"":1}', '{"a":01}', '{"a":-1}', '{"a":1,"a":2}', '{"a" :1}',
    '{"a":1,}', '{,}', '{"a":1}}', '[{"a":1},{"b":2}]', '{"a":"b":1}', '{"a":1 }',
    '{"a":1.5}', '{"a":\u00b2}', '{"\u00e9t\u00e9":7}', '{"l":{"b00":2560,"ids":3584},"s":1}'])
def test_flat_objects_read_as_json_reads_them(text):
    """The fast path for objects of plain keys and whole numbers (_flat)."""
    try:
        want = ("ok", json.loads(text))
    except ValueError:
        want = ("error",)
    for loads in (jsonlite._loads, jsonlite.loads):
        try:
            got = ("ok", loads(text))
        except ValueError:
            got = ("error",)
        assert got[0] == want[0] and (got[0] == "error" or same(got[1], want[1])), text
