"""OpenWrt's UCI file format, read the way libuci reads it.

    parse(data: bytes) -> ([Section], [(line, problem)])

A port of libuci's parser (file.c: uci_getln, parse_backslash,
parse_double_quote, parse_single_quote, parse_str, next_arg, assert_eol,
uci_parse_line and the uci_parse_* commands; util.c: uci_validate_str;
list.c: uci_set, uci_add_list) working on the same line buffer, so that
its corners come out the same: a ';' right after an unquoted, unescaped
word ends the line there, while after a quoted one it only ends the
statement; a line continuation ends a word when the next line starts with
a blank; `option x ''` and `option x` add no option; a named section
opened again continues it. Like libuci in its default (strict) mode the
first error refuses the file: the one problem names its line.
"""

_SPACE = frozenset(b" \t\n\v\f\r")       # C isspace()


def _runs(stops):
    """A bytes.translate table for _span: 0 for NUL and the stop bytes, 1
    for the bytes a run is made of."""
    t = bytearray(b"\1" * 256)
    t[0] = 0
    for c in stops:
        t[c] = 0
    return bytes(t)


# Runs of plain bytes are found by translate and find, not byte by byte:
# a CGI reads the file on every request.
_WORD = _runs(b"'\"#;\\ \t\n\v\f\r")
_RUN_IN = {34: _runs(b'"\\'), 39: _runs(b"'")}    # inside "..." and '...'
_CMD = _runs(b" \t")
_BLANKS = bytearray(256)
for _c in _SPACE:
    _BLANKS[_c] = 1
_BLANKS = bytes(_BLANKS)


def _span(buf, pos, table):
    """How many bytes from buf[pos] on the table maps to 1."""
    n = buf[pos:].translate(table).find(0)
    return max(0, len(buf) - pos) if n < 0 else n


_ALNUM = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                   b"0123456789_")


class Section:
    """One `config TYPE [NAME]` block: options map to (value, line), where
    value is a str for `option` and a list of (item, line) for `list`."""

    def __init__(self, type, name, line):
        self.type, self.name, self.line = type, name, line
        self.options = {}


class ParseError(Exception):
    def __init__(self, line, reason):
        Exception.__init__(self, reason)
        self.line, self.reason = line, reason


def validate_str(s, name, package=False):
    """util.c uci_validate_str: names are letters, digits and _ (and - for
    a package); a type may also hold any printable ASCII but blanks."""
    if not s:
        return False
    for c in s:
        if c in _ALNUM or (c == 45 and package):
            continue
        if name or c < 33 or c > 126:
            return False
    return True


class _Parser:
    """libuci's parse context: one line buffer (NUL-terminated, written in
    place as the C code does), the position in it, the lines read."""

    def __init__(self, data):
        self.data, self.off = data, 0
        self.buf = bytearray(b"\0")
        self.pos = 0
        self.filled = 0
        self.line = 0
        self.ended = True       # the line in the buffer ended with \n
        self.sections, self.named, self.section = [], {}, None

    # -- the buffer

    def getln(self, offset):
        """uci_getln: the next line (its \\n included) into buf at offset."""
        if self.off >= len(self.data):
            self.buf[offset:] = b"\0"
            return
        j = self.data.find(b"\n", self.off)
        end = len(self.data) if j < 0 else j + 1
        text = self.data[self.off:end]
        self.off = end
        self.buf[offset:] = text + b"\0"
        self.filled = offset + len(text)
        self.ended = text.endswith(b"\n")
        if self.ended:
            self.line += 1

    def ch(self, i):
        return self.buf[i] if i < len(self.buf) else 0

    def cur(self):
        pos = self.pos
        return self.buf[pos] if pos < len(self.buf) else 0

    def cstr(self, i):
        j = self.buf.index(0, i)
        return bytes(self.buf[i:j])

    def error(self, reason):
        raise ParseError(self.line if self.ended else self.line + 1, reason)

    # -- words

    def backslash(self):
        self.pos += 1
        c = self.cur()
        if c == 0 or c == 10 or (c == 13 and self.ch(self.pos + 1) == 10
                                 and self.ch(self.pos + 2) == 0):
            self.getln(self.pos)
            return False
        return True

    def skip_space(self):
        self.pos += _span(self.buf, self.pos, _BLANKS)

    def addc(self, target):
        self.buf[target] = self.buf[self.pos]
        self.pos += 1
        return target + 1

    def run(self, target, table):
        """addc for every byte of the run at pos (see _runs)."""
        buf, pos = self.buf, self.pos
        n = _span(buf, pos, table)
        end = pos + n
        if target != pos:
            buf[target:target + n] = buf[pos:end]
        self.pos = end
        return target + n

    def quoted(self, target, q):
        self.pos += 1
        while True:
            c = self.cur()
            if c == q:
                self.pos += 1
                return target
            if c == 0:
                self.getln(self.pos)
                if not self.cur():
                    self.error("EOF with unterminated %s" % chr(q))
                continue
            if c == 92 and q == 34:
                if not self.backslash():
                    continue
                target = self.addc(target)
                continue
            target = self.run(target, _RUN_IN[q])

    def word(self, target):
        """parse_str: one argument, quotes resolved, written at target."""
        more = True
        while True:
            c = self.cur()
            if c == 39 or c == 34:
                target = self.quoted(target, c)
            elif c == 35:                   # '#': the rest is a comment
                self.buf[self.pos] = 0
                break
            elif c == 0:
                break
            elif c == 59:                   # ';'
                more = False
                break
            elif c == 92:
                if self.backslash():
                    target = self.addc(target)
                # else continued on the next line
            else:
                target = self.run(target, _WORD)
            c = self.cur()
            if not c or c in _SPACE:
                break
        if self.cur() and more:
            self.pos += 1
        # Written where an unquoted, unescaped word ends: over its ';'.
        self.buf[target] = 0

    def next_arg(self, required, name, package=False):
        self.skip_space()
        val = self.pos
        if self.cur() == 59:
            self.buf[self.pos] = 0
            self.pos += 1
        else:
            self.word(val)
        if not self.buf[val]:
            if required:
                self.error("insufficient arguments")
            return val
        if name and not validate_str(self.cstr(val), name, package):
            self.error("invalid character in name field")
        return val

    def assert_eol(self):
        self.skip_space()
        if self.cstr(self.next_arg(False, False)):
            self.error("too many arguments")

    def skip_command(self, why):
        add = len(self.cstr(self.pos)) + 1
        if self.pos + add > self.filled:
            self.error(why)
        self.pos += add

    # -- statements

    def parse(self):
        while self.off < len(self.data):
            self.pos = 0
            self.getln(0)
            if self.buf[0]:
                self.parse_line()
        return self.sections

    def parse_line(self):
        self.skip_space()
        while True:
            # strtok(cur, " \t"): the command word ends at a blank or tab
            i = self.pos
            while self.buf[i] in (32, 9):
                i += 1
            if not self.buf[i]:
                return
            j = i + _span(self.buf, i, _CMD)
            word = bytes(self.buf[i:j])
            self.buf[j] = 0
            c, rest = word[:1], word[1:]
            if c == b"#":
                return
            if c == b"p" and rest in (b"", b"ackage"):
                self.skip_command("package without name")
                self.next_arg(True, True, True)
                self.assert_eol()
            elif c == b"c" and rest in (b"", b"onfig"):
                self.parse_config()
            elif c == b"o" and rest in (b"", b"ption"):
                self.parse_option(False)
            elif c == b"l" and rest in (b"", b"ist"):
                self.parse_option(True)
            else:
                self.error("invalid command")

    def statement_line(self):
        return self.line if self.ended else self.line + 1

    def parse_config(self):
        line = self.statement_line()
        self.skip_command("config without name")
        t = self.next_arg(True, False)
        if not validate_str(self.cstr(t), False):
            self.error("invalid character in type field")
        n = self.next_arg(False, True)
        self.assert_eol()
        type, name = self.cstr(t), self.cstr(n)
        sec = self.named.get(name) if name else None
        if sec is not None:
            if sec.type != type:
                self.error("section of different type overwrites prior "
                           "section with same name")
        else:
            sec = Section(type, name, line)
            self.sections.append(sec)
            if name:
                self.named[name] = sec
        self.section = sec

    def parse_option(self, is_list):
        line = self.statement_line()
        if self.section is None:
            self.error("option/list command found before the first section")
        self.skip_command("option without name")
        n = self.next_arg(True, True)
        v = self.next_arg(False, False)
        self.assert_eol()
        name, value = self.cstr(n), self.cstr(v)
        opts = self.section.options
        old = opts.get(name)
        if not is_list:
            if value:       # uci_set: an empty value sets nothing
                opts[name] = (value, line)
            return
        if old is None:
            opts[name] = ([(value, line)], line)
        elif isinstance(old[0], list):
            old[0].append((value, line))
        else:               # uci_add_list turns the option into a list
            opts[name] = ([old, (value, line)], old[1])


def parse(data):
    """UCI bytes -> ([Section], [(line, problem)]), names and values as
    bytes. A file libuci refuses gives no sections and one problem."""
    if b"\0" in data:
        return [], [(data[:data.index(b"\0")].count(b"\n") + 1,
                     "NUL byte in the file")]
    p = _Parser(data)
    try:
        return p.parse(), []
    except ParseError as e:
        return [], [(e.line, e.reason)]


def decode(sections):
    """Names and values as str (UTF-8); the first undecodable one is a
    problem at its line."""
    for sec in sections:
        try:
            sec.type = sec.type.decode("utf-8")
            sec.name = sec.name.decode("utf-8")
        except UnicodeDecodeError:
            return [(sec.line, "section type or name is not UTF-8")]
        opts = {}
        for key, (value, line) in sec.options.items():
            try:
                if isinstance(value, list):
                    value = [(v.decode("utf-8"), ln) for v, ln in value]
                else:
                    value = value.decode("utf-8")
            except UnicodeDecodeError:
                return [(line, "value of %s is not UTF-8"
                         % key.decode("ascii"))]
            opts[key.decode("ascii")] = (value, line)
        sec.options = opts
    return []
