"""JSON for our own answers and lease records, without importing json.

`import json` brings re, enum and their compiled patterns with it: a third
of a CGI request's time. What we write is plain (ASCII, compact), so:

    dumps(obj)  the bytes json.dumps(obj, separators=(",", ":")) gives, for
                dict (str keys), list, tuple, str, int, float, bool, None
    loads(text) json.loads(text); small texts without escapes are read
                here, anything else (escapes, NaN, a syntax error) is left
                to the json module, which also words the errors

Where the process has imported json (load_json: the server does, once it
listens), both are json's own C code: several times faster than ours, and
the same answers.
"""

_PLAIN = frozenset(" !#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTU"
                   "VWXYZ[]^_`abcdefghijklmnopqrstuvwxyz{|}~")
_SHORT = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t",
          "\b": "\\b", "\f": "\\f"}
# What comes here is one record (leases.py hands listings of many rows to
# json itself); a bigger text goes to json's C parser, whose import then
# pays for itself.
SMALL = 8192


def _str(s):
    if set(s) <= _PLAIN:
        return '"' + s + '"'
    out = ['"']
    for c in s:
        if c in _PLAIN:
            out.append(c)
        elif c in _SHORT:
            out.append(_SHORT[c])
        else:
            o = ord(c)
            if o >= 0x10000:
                o -= 0x10000
                out.append("\\u%04x\\u%04x" % (0xD800 | (o >> 10), 0xDC00 | (o & 0x3FF)))
            else:
                out.append("\\u%04x" % o)
    out.append('"')
    return "".join(out)


# json's encoder and module, once load_json() has imported it; not merely
# json in sys.modules, which another thread may be importing right now.
_encode = None
_json = None


def load_json():
    """Import json: dumps and loads use its C code from then on (serve)."""
    global _encode, _json
    import json
    _encode = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
    _json = json


def dumps(obj):
    """Compact ASCII JSON; NaN and infinities become null (json would
    write NaN, which is not JSON)."""
    if _encode is not None:
        try:
            return _encode(obj)
        except ValueError:
            pass            # NaN or an infinity: null, below
    return _dumps(obj)


def _dumps(obj):
    if obj is None:
        return "null"
    if obj is True:
        return "true"
    if obj is False:
        return "false"
    if isinstance(obj, str):
        return _str(obj)
    if isinstance(obj, int):
        return int.__repr__(obj)
    if isinstance(obj, float):
        if obj != obj or obj in (float("inf"), float("-inf")):
            return "null"
        return float.__repr__(obj)
    if isinstance(obj, dict):
        return "{" + ",".join(_key(k) + ":" + _dumps(v) for k, v in obj.items()) + "}"
    if isinstance(obj, (list, tuple)):
        return "[" + ",".join(_dumps(v) for v in obj) + "]"
    raise TypeError("cannot encode %r" % type(obj))


def _key(k):
    """A dict key as json writes it."""
    if isinstance(k, str):
        return _str(str.__str__(k))
    if k is None or k is True or k is False:
        return '"%s"' % _dumps(k)
    if isinstance(k, int):
        return '"%s"' % int.__repr__(k)
    if isinstance(k, float):
        if k != k:
            return '"NaN"'
        if k in (float("inf"), float("-inf")):
            return '"%sInfinity"' % ("-" if k < 0 else "")
        return '"%s"' % float.__repr__(k)
    raise TypeError("keys must be str, int, float, bool or None, not %s" % type(k).__name__)


class _Other(Exception):
    """Not for this reader: the json module decides."""


_WS = " \t\n\r"
_NUMBER = "0123456789+-.eE"
_WORDS = {"n": ("null", None), "t": ("true", True), "f": ("false", False)}


def _skip(s, i):
    while i < len(s) and s[i] in _WS:
        i += 1
    return i


def _number(tok):
    t = tok[1:] if tok[:1] == "-" else tok
    mant, e, exp = t.replace("E", "e").partition("e")
    whole, dot, frac = mant.partition(".")
    if not whole.isdigit() or (len(whole) > 1 and whole[0] == "0") or \
            (dot and not frac.isdigit()):
        raise _Other
    if e:
        digits = exp[1:] if exp[:1] in ("+", "-") else exp
        if not digits.isdigit():
            raise _Other
    return float(tok) if dot or e else int(tok)


def _number_at(s, i):
    """(number, index after it) of the number at s[i]."""
    # Its end by str.lstrip on a window, not a loop over characters: the
    # meta record every lease file transaction reads is ~130 numbers.
    t = s[i:i + 32]
    j = i + len(t) - len(t.lstrip(_NUMBER))
    if j == i + 32:
        while j < len(s) and s[j] in _NUMBER:
            j += 1
    tok = s[i:j]
    if tok.isdigit() and (tok[0] != "0" or j == i + 1):
        return int(tok), j
    return _number(tok), j


def _flat(s, i):
    """(dict, index after it) when s[i:] starts with a compact object of
    plain keys and whole numbers, like the layout in the lease file's meta
    record (~130 of them, read by every process's first transaction), split
    apart by str methods; None for anything else, which _value reads."""
    j = s.find("}", i)
    body = s[i + 1:j]
    if j < 0 or not body or "{" in body or "[" in body:
        return None
    out = {}
    for item in body.split(","):
        key, _, num = item.rpartition(":")
        if not (len(key) >= 2 and key[0] == '"' == key[-1] and num.isdigit()
                and num.isascii() and (num[0] != "0" or num == "0")):
            return None
        key = key[1:-1]
        if '"' in key or not key.isprintable():
            return None
        out[key] = int(num)
    return out, j + 1


def _value(s, i):
    """(value, index after it) of the value at s[i]."""
    c = s[i]
    if c == '"':
        j = s.index('"', i + 1)
        text = s[i + 1:j]
        if not text.isprintable():          # control characters: json refuses them
            raise _Other
        return text, j + 1
    if c in "-0123456789":
        return _number_at(s, i)
    if c == "{":
        flat = _flat(s, i)
        if flat is not None:
            return flat
        out = {}
        i = _skip(s, i + 1)
        if s[i] == "}":
            return out, i + 1
        while True:
            if s[i] != '"':
                raise _Other
            j = s.index('"', i + 1)
            key = s[i + 1:j]
            if not key.isprintable():
                raise _Other
            i = j + 1
            if s[i] != ":":
                i = _skip(s, i)
                if s[i] != ":":
                    raise _Other
            i += 1
            if s[i] in _WS:
                i = _skip(s, i)
            out[key], i = _value(s, i)
            if s[i] in _WS:
                i = _skip(s, i)
            if s[i] == "}":
                return out, i + 1
            if s[i] != ",":
                raise _Other
            i += 1
            if s[i] in _WS:
                i = _skip(s, i)
    if c == "[":
        out = []
        i = _skip(s, i + 1)
        if s[i] == "]":
            return out, i + 1
        while True:
            v, i = _value(s, i)
            out.append(v)
            if s[i] in _WS:
                i = _skip(s, i)
            if s[i] == "]":
                return out, i + 1
            if s[i] != ",":
                raise _Other
            i = _skip(s, i + 1)
    word, v = _WORDS.get(c, ("", None))
    if word and s.startswith(word, i):
        return v, i + len(word)
    raise _Other


def loads(text):
    """json.loads(text), for str or bytes."""
    if _json is not None:
        return _json.loads(text)
    return _loads(text)


def _loads(text):
    if len(text) <= SMALL:
        try:
            s = text.decode("ascii") if isinstance(text, (bytes, bytearray)) else text
            if "\\" not in s:
                value, i = _value(s, _skip(s, 0))
                if _skip(s, i) == len(s):
                    return value
        except (_Other, IndexError, ValueError, RecursionError):
            pass
    import json
    return json.loads(text)
