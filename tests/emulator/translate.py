"""translate.py: rewrite a plain-CUDA source file into C++ that g++ compiles against the CPU
emulator (tests/emulator/cuda_emu.h). The kernel files themselves are never edited: the build
(tests/emulator/build.py) translates a mirror of csrc/ into build/emu/src/ and compiles that.

Rewrites (comments and string literals are left alone; every rewrite keeps the line count, and a
`#line` directive keeps compiler messages and __FILE__ pointing at the original file):
- `k<<<grid, block[, smem[, stream]]>>>(args)`  ->  `::gptk_emu::make_launcher(k, grid, block, ...)(args)`
- `__shared__ T name[N]...;`  ->  a reference to per-block storage from ::gptk_emu::shared_var (one
  heap allocation per declaration and block, poisoned, ASan-checked); `extern __shared__ T name[];`
  -> a pointer to the launch's dynamic shared memory.
- `__global__` function bodies get a first statement `::gptk_emu::kernel_entry(...)` (records the
  kernel's name, checks `__launch_bounds__`).
- `asm [volatile](...)` statements: the PTX instructions our kernels use are rewritten into calls of
  their emulations (cuda_emu.h, namespace gptk_emu::ptx); anything else becomes a call that faults
  at run time ("inline PTX that the emulator does not implement") and is listed in the report.

Usage: python tests/emulator/translate.py SRC.cu OUT.cpp
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path


class TranslateError(Exception):
    pass


@dataclass
class Report:
    launches: int = 0
    shared: int = 0
    kernels: int = 0
    asm: int = 0
    unsupported_ptx: list = field(default_factory=list)


# ---- lexing helpers ------------------------------------------------------------------------------

def mask_code(src: str) -> str:
    """src with comments and string/char literals replaced by spaces (newlines kept), so that
    searches and bracket matching see code only. Same length as src."""
    out = list(src)
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if c == "/" and i + 1 < n and src[i + 1] == "/":
            j = src.find("\n", i)
            j = n if j < 0 else j
            for k in range(i, j):
                out[k] = " "
            i = j
        elif c == "/" and i + 1 < n and src[i + 1] == "*":
            j = src.find("*/", i + 2)
            j = n if j < 0 else j + 2
            for k in range(i, j):
                if out[k] != "\n":
                    out[k] = " "
            i = j
        elif c == '"' or (c == "'" and not (i > 0 and (src[i - 1].isalnum() and i + 1 < n and src[i + 1].isalnum()))):
            q = c
            j = i + 1
            while j < n and src[j] != q:
                j += 2 if src[j] == "\\" else 1
            j = min(j + 1, n)
            for k in range(i + 1, j - 1):  # keep the quotes, blank the contents
                if out[k] != "\n":
                    out[k] = " "
            i = j
        else:
            i += 1
    return "".join(out)


_OPEN = {"(": ")", "[": "]", "{": "}"}


def match_forward(masked: str, i: int) -> int:
    """Index just past the bracket that closes the one at masked[i]."""
    stack = []
    n = len(masked)
    j = i
    while j < n:
        c = masked[j]
        if c in _OPEN:
            stack.append(_OPEN[c])
        elif c in ")]}":
            if not stack or stack.pop() != c:
                raise TranslateError(f"unbalanced '{c}' at offset {j}")
            if not stack:
                return j + 1
        j += 1
    raise TranslateError(f"unclosed '{masked[i]}' at offset {i}")


def split_top(text: str, masked: str, sep: str, scope_aware: bool = True) -> list[str]:
    """Split text at the top-level (outside brackets) occurrences of the one-character sep (a ':'
    that is part of '::' does not count, unless scope_aware is False: in an asm statement '::' is
    two section separators)."""
    parts, depth, start = [], 0, 0
    for j, c in enumerate(masked):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == sep and depth == 0:
            if sep == ":" and scope_aware and ((j + 1 < len(masked) and masked[j + 1] == ":") or (j > 0 and masked[j - 1] == ":")):
                continue
            parts.append(text[start:j])
            start = j + 1
    parts.append(text[start:])
    return parts


def line_of(src: str, i: int) -> int:
    return src.count("\n", 0, i) + 1


def keep_lines(original: str, replacement: str) -> str:
    """The replacement on one line, followed by as many newlines as the original spanned."""
    return " ".join(replacement.split("\n")) + "\n" * original.count("\n")


def squash(s: str) -> str:
    return " ".join(s.split())


# ---- inline PTX ------------------------------------------------------------------------------------

@dataclass
class Operand:
    constraint: str
    expr: str
    output: bool
    name: str = ""


def parse_asm(body: str, masked_body: str):
    sections = split_top(body, masked_body, ":", scope_aware=False)
    masked_sections = split_top(masked_body, masked_body, ":", scope_aware=False)
    template = "".join(bytes(m, "utf-8").decode("unicode_escape") for m in re.findall(r'"((?:[^"\\]|\\.)*)"', sections[0]))
    operands: list[Operand] = []
    for k, (sec, msec) in enumerate(zip(sections[1:3], masked_sections[1:3])):
        if not sec.strip():
            continue
        for item, mitem in zip(split_top(sec, msec, ","), split_top(msec, msec, ",")):
            m = re.match(r'\s*(?:\[(\w+)\]\s*)?"([^"]*)"\s*\((.*)\)\s*$', item, re.S)
            if not m:
                raise TranslateError(f"cannot parse asm operand {item.strip()!r}")
            operands.append(Operand(m.group(2), squash(m.group(3)), k == 0, m.group(1) or ""))
    # named operands (%[name]) -> positional
    for i, op in enumerate(operands):
        if op.name:
            template = template.replace(f"%[{op.name}]", f"%{i}")
    return template, operands


def normalize_ptx(t: str) -> str:
    """Canonical spacing: one space between tokens, "{ a, b }", "[%0]", "x, y", "a; b"; no final ';'."""
    t = re.sub(r"\s+", " ", t)
    t = re.sub(r"\s*([{}])\s*", r" \1 ", t)
    t = re.sub(r"\s*,\s*", ", ", t)
    t = re.sub(r"\s*;\s*", "; ", t)
    t = re.sub(r"\[\s*", "[", t)
    t = re.sub(r"\s*\]", "]", t)
    t = re.sub(r"\s+", " ", t).strip()
    return t.rstrip("; ").strip()


P = "::gptk_emu::ptx::"


def _rd(op: Operand) -> str:
    c = op.constraint.lstrip("=+&")
    if c in ("r", "f"):
        return f"{P}b32({op.expr})"
    if c == "h":
        return f"{P}b16({op.expr})"
    if c == "l":
        return f"{P}b64({op.expr})"
    if c == "n":
        return f"({op.expr})"
    raise TranslateError(f"asm operand constraint {op.constraint!r} is not emulated")


def _wr(op: Operand, bits: str) -> str:
    c = op.constraint.lstrip("=+&")
    if c in ("r", "f"):
        return f"{P}set32({op.expr}, (uint32_t)({bits}))"
    if c == "h":
        return f"({op.expr}) = (unsigned short)({bits})"
    raise TranslateError(f"asm output constraint {op.constraint!r} is not emulated")


def _num(ops, s: str) -> Operand:
    return ops[int(s.strip().lstrip("%"))]


def _regs(ops, s: str) -> list[Operand]:
    return [_num(ops, x) for x in s.split(",") if x.strip()]


def emit_ptx(template: str, ops: list[Operand], report: Report, where: str) -> str:
    t = normalize_ptx(template)
    if t == "":
        return "((void)0)"  # an optimisation barrier only (e.g. asm volatile("" : "+r"(x)))
    m = re.fullmatch(r"ex2\.approx(\.ftz)?\.f32 %(\d+), %(\d+)", t)
    if m:
        return _wr(_num(ops, m[2]), f"{P}ex2({_rd(_num(ops, m[3]))}, {'true' if m[1] else 'false'})")
    m = re.fullmatch(r"cvt\.f32\.(f16|bf16) %(\d+), %(\d+)", t)
    if m:
        return _wr(_num(ops, m[2]), f"{P}cvt_f32_{m[1]}((uint16_t){_rd(_num(ops, m[3]))})")
    m = re.fullmatch(r"cvt\.rn\.(f16|bf16)\.f32 %(\d+), %(\d+)", t)
    if m:
        return _wr(_num(ops, m[2]), f"{P}cvt_rn_{m[1]}_f32({_rd(_num(ops, m[3]))})")
    m = re.fullmatch(r"\{ \.reg \.b16 (\w+), (\w+); mov\.b32 \{ (\w+), (\w+) \}, %(\d+); cvt\.f32\.(f16|bf16) %(\d+), (\w+);? \}", t)
    if m and (m[3], m[4]) == (m[1], m[2]) and m[8] in (m[1], m[2]):
        shift = 0 if m[8] == m[1] else 16
        return _wr(_num(ops, m[7]), f"{P}cvt_f32_{m[6]}((uint16_t)({_rd(_num(ops, m[5]))} >> {shift}))")
    m = re.fullmatch(r"(shl|shr|and|or|xor)\.(b32|u32) %(\d+), %(\d+), (0x[0-9a-fA-F]+|\d+|%\d+)", t)
    if m:
        rhs = _rd(_num(ops, m[5])) if m[5].startswith("%") else f"{m[5]}u"
        sym = {"shl": "<<", "shr": ">>", "and": "&", "or": "|", "xor": "^"}[m[1]]
        return _wr(_num(ops, m[3]), f"{_rd(_num(ops, m[4]))} {sym} {rhs}")
    m = re.fullmatch(r"mov\.(b32|u32|f32) %(\d+), %(\d+)", t)
    if m:
        return _wr(_num(ops, m[2]), _rd(_num(ops, m[3])))
    m = re.fullmatch(r"cp\.async\.(ca|cg)\.shared(?:::cta)?\.global(?:\.L2::\w+)? \[%(\d+)\], \[%(\d+)\], (\d+)(?:, %(\d+))?", t)
    if m:
        dst, src, size = _num(ops, m[2]), _num(ops, m[3]), int(m[4])
        src_size = f"(int){_rd(_num(ops, m[5]))}" if m[5] else str(size)
        return (f"::gptk_emu::cp_async({_rd(dst)}, (const void*)({src.expr}), {size}, {src_size}, "
                f"__FILE__, __LINE__)")
    if re.fullmatch(r"cp\.async\.commit_group", t):
        return "::gptk_emu::cp_async_commit()"
    m = re.fullmatch(r"cp\.async\.wait_group (%\d+|\d+)", t)
    if m:
        n = f"(int){_rd(_num(ops, m[1]))}" if m[1].startswith("%") else m[1]
        return f"::gptk_emu::cp_async_wait({n})"
    if re.fullmatch(r"cp\.async\.wait_all", t):
        return "::gptk_emu::cp_async_wait(-1)"
    m = re.fullmatch(r"ldmatrix\.sync\.aligned\.m8n8\.x(1|2|4)(\.trans)?\.shared(?:::cta)?\.b16 \{ ([^}]*) \}, \[%(\d+)\]", t)
    if m:
        regs = _regs(ops, m[3])
        if len(regs) != int(m[1]):
            raise TranslateError(f"{where}: ldmatrix .x{m[1]} with {len(regs)} registers")
        outs = ", ".join(r.expr for r in regs)
        return (f"{P}ldmatrix_({m[1]}, {'true' if m[2] else 'false'}, {_rd(_num(ops, m[4]))}, __FILE__, __LINE__, "
                f"{outs})")
    m = re.fullmatch(r"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.(bf16|f16)\.(bf16|f16)\.f32 "
                     r"\{ ([^}]*) \}, \{ ([^}]*) \}, \{ ([^}]*) \}, \{ ([^}]*) \}", t)
    if m and m[1] == m[2]:
        d, a, b, c = (_regs(ops, m[k]) for k in (3, 4, 5, 6))
        if (len(d), len(a), len(b), len(c)) != (4, 4, 2, 4):
            raise TranslateError(f"{where}: mma.m16n8k16 operand counts {len(d), len(a), len(b), len(c)}")
        args = [x.expr for x in d] + [_rd(x) for x in a + b + c]
        return f"{P}mma_m16n8k16_({'true' if m[1] == 'bf16' else 'false'}, {', '.join(args)}, __FILE__, __LINE__)"
    try:
        return emit_statements(t, ops, where)
    except Unsupported:
        pass
    report.unsupported_ptx.append(f"{where}: {t}")
    esc = t.replace("\\", "\\\\").replace('"', '\\"')
    return f'{P}unsupported("{esc}", __FILE__, __LINE__)'


# ---- statement-level PTX (the sm_90 instructions: wgmma, mbarrier, TMA, named barriers, ...) --------
#
# A template is a sequence of statements, optionally in { } scopes, with .reg declarations of local
# registers (".reg .pred p;", ".reg .b32 %%r;"), optional guards ("@p", "@!p") and operands that are
# asm operands (%N), locals, immediates, the sink "_", addresses "[x]" / "[x, { c0, ... }]" and vectors
# "{ a, b }". Each statement becomes C++ (locals become C++ variables); a template with any statement
# this does not know is reported as not emulated. No labels or branches (the kernel contract).

class Unsupported(Exception):
    pass


def _split_ops(text: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for c in text:
        if c in "[{(":
            depth += 1
        elif c in "]})":
            depth -= 1
        if c == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += c
    if cur.strip():
        out.append(cur.strip())
    return out


def _statements(t: str) -> list[str]:
    """Statements and scope braces of a normalized template, in order."""
    out, i, n = [], 0, len(t)
    while i < n:
        while i < n and t[i] in " ;":
            i += 1
        if i >= n:
            break
        if t[i] in "{}":
            out.append(t[i])
            i += 1
            continue
        depth, j = 0, i
        while j < n:
            c = t[j]
            if c in "[{":
                depth += 1
            elif c in "]}":
                if depth == 0:
                    break  # a scope's closing brace ends the statement
                depth -= 1
            elif c == ";" and depth == 0:
                break
            j += 1
        out.append(t[i:j].strip())
        i = j
    return out


class _Ctx:
    def __init__(self, ops: list[Operand], where: str):
        self.ops, self.where = ops, where
        self.locals: dict[str, str] = {}  # PTX name -> C++ type

    def local(self, name: str) -> str:
        return "_l_" + re.sub(r"\W", "_", name)

    def is_local(self, tok: str) -> bool:
        return tok.lstrip("%") in self.locals

    def op(self, tok: str) -> Operand:
        return self.ops[int(tok[1:])]

    def val(self, tok: str, bits: int = 32) -> str:
        """C++ expression of a source operand's value."""
        tok = tok.strip()
        if re.fullmatch(r"%\d+", tok):
            o = self.op(tok)
            if o.constraint.lstrip("=+&") == "n":
                return f"({o.expr})"
            return f"{P}b64({o.expr})" if bits == 64 or o.constraint.lstrip("=+&") == "l" else _rd(o)
        if self.is_local(tok):
            return self.local(tok.lstrip("%"))
        if re.fullmatch(r"-?(0[xX][0-9a-fA-F]+|\d+)", tok):
            v = int(tok, 0)
            return f"{v}ull" if bits == 64 else (f"{v}u" if v >= 0 else f"({v})")
        raise Unsupported(tok)

    def pred(self, tok: str) -> str:
        tok = tok.strip()
        neg = tok.startswith("!")
        tok = tok.lstrip("!")
        if self.is_local(tok) and self.locals[tok.lstrip("%")] == "bool":
            e = self.local(tok.lstrip("%"))
        else:
            e = f"({self.val(tok)} != 0)"
        return f"(!{e})" if neg else e

    def write(self, tok: str, value: str, bits: int = 32) -> str:
        tok = tok.strip()
        if tok == "_":
            return f"(void)({value});"
        if re.fullmatch(r"%\d+", tok):
            o = self.op(tok)
            c = o.constraint.lstrip("=+&")
            if c == "l":
                return f"{P}set64({o.expr}, (uint64_t)({value}));"
            return _wr(o, value) + ";"
        if self.is_local(tok):
            return f"{self.local(tok.lstrip('%'))} = ({value});"
        raise Unsupported(tok)

    def smem(self, tok: str) -> str:
        """A [addr] shared-memory operand (a 32-bit shared-window address, or a generic pointer)."""
        m = re.fullmatch(r"\[\s*(%?\w+)\s*(?:\+\s*(-?\w+))?\s*\]", tok.strip())
        if not m:
            raise Unsupported(tok)
        base = m[1]
        if re.fullmatch(r"%\d+", base) and self.op(base).constraint.lstrip("=+&") == "l":
            e = f"{P}smem_of({self.op(base).expr}, __FILE__, __LINE__)"
        else:
            e = f"(uint32_t)({self.val(base)})"
        return f"({e} + {int(m[2], 0)}u)" if m[2] else e

    def gptr(self, tok: str) -> str:
        tok = tok.strip()
        if re.fullmatch(r"%\d+", tok):
            return f"(const void*)(uintptr_t)({self.val(tok, 64)})"
        raise Unsupported(tok)


def _vec(tok: str) -> list[str]:
    tok = tok.strip()
    if not (tok.startswith("{") and tok.endswith("}")):
        raise Unsupported(tok)
    return _split_ops(tok[1:-1])


_QUALS_IGNORED = {"shared", "shared::cta", "shared::cluster", "b64", "release", "relaxed", "acquire", "cta",
                  "cluster", "sync", "aligned", "global", "gpu"}


def _stmt(ctx: _Ctx, st: str) -> str:
    guard = None
    m = re.match(r"@(!?%?\w+)\s+(.*)$", st)
    if m:
        guard, st = m[1], m[2]
    parts = st.split(" ", 1)
    opcode, rest = parts[0], (parts[1] if len(parts) > 1 else "")
    args = _split_ops(rest)
    code = _instr(ctx, opcode, args)
    if guard:
        code = f"if ({ctx.pred(guard)}) {{ {code} }}"
    return code


def _instr(ctx: _Ctx, opcode: str, a: list[str]) -> str:
    w = opcode.split(".")
    head, mods = w[0], w[1:]
    q = set(mods)
    # -- scalar helpers around the sm_90 instructions
    if head == "setp" and len(a) == 3:
        cmp = {"ne": "!=", "eq": "==", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}.get(mods[0])
        if cmp is None:
            raise Unsupported(opcode)
        cast = "(int32_t)" if "s32" in q else "(uint32_t)"
        return ctx.write(a[0], f"{cast}{ctx.val(a[1])} {cmp} {cast}{ctx.val(a[2])}")
    if head == "selp" and len(a) == 4:
        return ctx.write(a[0], f"{ctx.pred(a[3])} ? (uint32_t){ctx.val(a[1])} : (uint32_t){ctx.val(a[2])}")
    if head == "mov" and len(a) == 2 and mods and mods[0] in ("b32", "u32", "s32", "b64", "u64"):
        bits = 64 if mods[0] in ("b64", "u64") else 32
        return ctx.write(a[0], ctx.val(a[1], bits), bits)
    # -- wgmma
    if head == "wgmma":
        if mods[:3] == ["fence", "sync", "aligned"] and not a:
            return f"{P}wgmma_fence(__FILE__, __LINE__);"
        if mods[:3] == ["commit_group", "sync", "aligned"] and not a:
            return f"{P}wgmma_commit(__FILE__, __LINE__);"
        if mods[:3] == ["wait_group", "sync", "aligned"] and len(a) == 1:
            return f"{P}wgmma_wait((int){ctx.val(a[0])}, __FILE__, __LINE__);"
        mm = re.fullmatch(r"mma_async\.sync\.aligned\.m64n(\d+)k16\.f32\.(bf16|f16)\.(bf16|f16)", ".".join(mods))
        if mm and mm[2] == mm[3]:
            n = int(mm[1])
            d = _vec(a[0])
            if n % 8 or not 8 <= n <= 256 or len(d) != n // 2:
                raise TranslateError(f"{ctx.where}: wgmma m64n{n}k16 with {len(d)} accumulator registers")
            for x in d:
                if not re.fullmatch(r"%\d+", x):
                    raise Unsupported(x)
            dptrs = ", ".join(f"{P}regp({ctx.op(x).expr})" for x in d)
            if a[1].strip().startswith("{"):  # RS: A from registers
                av = _vec(a[1])
                if len(av) != 4 or len(a) != 7:
                    raise Unsupported(opcode)
                a_arr = ", ".join(ctx.val(x) for x in av)
                desc_a, rest = "0ull", a[2:]
                scale_d, sa, sb, tb = rest[1], rest[2], rest[3], rest[4]
                ta = "0"
                a_decl = f"const uint32_t _wa[4] = {{{a_arr}}};"
                a_ptr = "_wa"
            else:
                if len(a) != 8:
                    raise Unsupported(opcode)
                desc_a = ctx.val(a[1], 64)
                rest = a[2:]
                scale_d, sa, sb, ta, tb = rest[1], rest[2], rest[3], rest[4], rest[5]
                a_decl, a_ptr = "", "nullptr"
            desc_b = ctx.val(rest[0], 64)
            return (f"{a_decl} void* const _wd[] = {{{dptrs}}}; "
                    f"{P}wgmma({n}, {'true' if mm[2] == 'bf16' else 'false'}, _wd, {desc_a}, {a_ptr}, {desc_b}, "
                    f"(int){ctx.pred(scale_d)}, (int){ctx.val(sa)}, (int){ctx.val(sb)}, (int){ctx.val(ta)}, "
                    f"(int){ctx.val(tb)}, __FILE__, __LINE__);")
        raise Unsupported(opcode)
    # -- fences
    if head == "fence":
        if mods[:2] == ["proxy", "async"] and set(mods[2:]) <= {"shared::cta", "shared::cluster", "global"} and not a:
            return f"{P}fence_proxy_async(__FILE__, __LINE__);"
        if mods and mods[0] == "mbarrier_init" and not a:
            return "(void)0;"  # orders mbarrier.init for the cluster: nothing to order here
        raise Unsupported(opcode)
    # -- mbarrier
    if head == "mbarrier":
        op = mods[0] if mods else ""
        rest = [x for x in mods[1:] if x not in _QUALS_IGNORED]
        if op == "init" and not rest and len(a) == 2:
            return f"{P}mbar_init({ctx.smem(a[0])}, (uint32_t){ctx.val(a[1])}, __FILE__, __LINE__);"
        if op == "arrive" and rest in ([], ["expect_tx"]) and len(a) == (3 if rest else 2):
            tx = f"(uint32_t){ctx.val(a[2])}" if rest else "0u"
            call = f"{P}mbar_arrive({ctx.smem(a[1])}, {tx}, __FILE__, __LINE__)"
            return ctx.write(a[0], call, 64)
        if op == "expect_tx" and not rest and len(a) == 2:
            return f"{P}mbar_expect_tx({ctx.smem(a[0])}, (uint32_t){ctx.val(a[1])}, __FILE__, __LINE__);"
        if op == "try_wait" and rest == ["parity"] and len(a) in (3, 4):  # (a 4th operand: the suspend-time hint)
            call = f"{P}mbar_try_wait_parity({ctx.smem(a[1])}, (uint32_t){ctx.val(a[2])}, __FILE__, __LINE__)"
            return ctx.write(a[0], call)
        raise Unsupported(opcode)
    # -- TMA (bulk tensor copies) and bulk async-groups
    if head == "cp" and mods[:3] == ["async", "bulk", "tensor"]:
        rank = int(mods[3][0]) if len(mods) > 3 and re.fullmatch(r"[1-5]d", mods[3]) else 0
        tail = set(mods[4:])
        hint = "L2::cache_hint" in tail
        tail.discard("L2::cache_hint")
        tail.discard("tile")  # (the default load mode)
        load = {"shared::cluster", "global", "mbarrier::complete_tx::bytes"}
        store = {"global", "shared::cta", "bulk_group"}
        if rank and (tail == load or tail == {"shared::cta", "global", "mbarrier::complete_tx::bytes"}) and \
                len(a) == 3 + hint:
            tmap, coords = _tensor_operand(ctx, a[1], rank)
            return (f"{{ const int32_t _c[5] = {{{coords}}}; {P}tma_load({rank}, {ctx.smem(a[0])}, {tmap}, _c, "
                    f"{ctx.smem(a[2])}, __FILE__, __LINE__); }}")
        if rank and tail == store and len(a) == 2 + hint:
            tmap, coords = _tensor_operand(ctx, a[0], rank)
            return (f"{{ const int32_t _c[5] = {{{coords}}}; {P}tma_store({rank}, {tmap}, _c, {ctx.smem(a[1])}, "
                    f"__FILE__, __LINE__); }}")
        raise Unsupported(opcode)
    if head == "cp" and mods[:3] == ["async", "bulk", "commit_group"] and not a:
        return f"{P}bulk_commit(__FILE__, __LINE__);"
    if head == "cp" and mods[:3] == ["async", "bulk", "wait_group"] and len(a) == 1 and mods[3:] in ([], ["read"]):
        return f"{P}bulk_wait((int){ctx.val(a[0])}, {'true' if mods[3:] else 'false'}, __FILE__, __LINE__);"
    if head == "prefetch" and mods in (["tensormap"], ["param", "tensormap"], ["const", "tensormap"]) and len(a) == 1:
        return f"{P}prefetch_tensormap({ctx.gptr(a[0].strip()[1:-1])}, __FILE__, __LINE__);"
    # -- named barriers
    if head in ("bar", "barrier") and mods and mods[0] in ("sync", "arrive", "cta"):
        kind = [x for x in mods if x not in ("cta", "aligned")]
        if kind in (["sync"], ["arrive"]) and len(a) in (1, 2):
            if kind == ["arrive"] and len(a) != 2:
                raise TranslateError(f"{ctx.where}: bar.arrive needs a thread count")
            cnt = f"(int){ctx.val(a[1])}" if len(a) == 2 else "-1"
            return (f"{P}named_barrier((int){ctx.val(a[0])}, {cnt}, {'true' if kind == ['sync'] else 'false'}, "
                    f"__FILE__, __LINE__);")
        raise Unsupported(opcode)
    # -- setmaxnreg, elect, stmatrix
    if head == "setmaxnreg" and len(mods) == 4 and mods[0] in ("inc", "dec") and mods[1:] == ["sync", "aligned", "u32"] \
            and len(a) == 1:
        return f"{P}setmaxnreg({'true' if mods[0] == 'inc' else 'false'}, (int){ctx.val(a[0])}, __FILE__, __LINE__);"
    if head == "elect" and mods == ["sync"] and len(a) == 2:
        d, _, p = a[0].partition("|")
        return (f"{{ bool _ep = false; const uint32_t _el = {P}elect_sync((uint32_t){ctx.val(a[1])}, &_ep, __FILE__, "
                f"__LINE__); {ctx.write(d, '_el')} {ctx.write(p, '_ep') if p.strip() != '_' else ''} }}")
    if head == "stmatrix" and {"sync", "aligned", "m8n8", "b16"} <= q and len(a) == 2:
        num = next((int(x[1]) for x in mods if re.fullmatch(r"x[124]", x)), 0)
        regs = _vec(a[1])
        if not num or len(regs) != num or not q <= {"sync", "aligned", "m8n8", "x1", "x2", "x4", "trans", "shared",
                                                     "shared::cta", "b16"}:
            raise Unsupported(opcode)
        vals = ", ".join(ctx.val(x) for x in regs)
        return (f"{{ const uint32_t _sr[4] = {{{vals}}}; {P}stmatrix({num}, {'true' if 'trans' in q else 'false'}, "
                f"{ctx.smem(a[0])}, _sr, __FILE__, __LINE__); }}")
    raise Unsupported(opcode)


def _tensor_operand(ctx: _Ctx, tok: str, rank: int) -> tuple[str, str]:
    """[tmap, {c0, ...}] -> (tensor map pointer expression, coordinate list padded to 5)."""
    tok = tok.strip()
    if not (tok.startswith("[") and tok.endswith("]")):
        raise Unsupported(tok)
    inner = _split_ops(tok[1:-1])
    if len(inner) != 2:
        raise Unsupported(tok)
    coords = _vec(inner[1])
    if len(coords) != rank:
        raise TranslateError(f"{ctx.where}: a {rank}d tensor copy with {len(coords)} coordinates")
    vals = [f"(int32_t){ctx.val(c)}" for c in coords] + ["0"] * (5 - rank)
    return ctx.gptr(inner[0]), ", ".join(vals)


def emit_statements(t: str, ops: list[Operand], where: str) -> str:
    """C++ for a template of sm_90-era statements (raises Unsupported if any is not known)."""
    t = t.replace("%%", "%")  # GCC's escaped '%' of local register names
    ctx = _Ctx(ops, where)
    out = []
    for st in _statements(t):
        if st in "{}":
            out.append(st)
            continue
        m = re.fullmatch(r"\.reg \.(pred|b32|u32|s32|b64|u64) (.+)", st)
        if m:
            ctype = {"pred": "bool", "b32": "uint32_t", "u32": "uint32_t", "s32": "int32_t", "b64": "uint64_t",
                     "u64": "uint64_t"}[m[1]]
            names = [x.strip().lstrip("%") for x in m[2].split(",")]
            for nm in names:
                ctx.locals[nm] = ctype
            out.append(" ".join(f"{ctype} {ctx.local(nm)} = {{}};" for nm in names))
            continue
        out.append(_stmt(ctx, st))
    return "do { " + " ".join(out) + " } while (0)"


# ---- the rewrites -----------------------------------------------------------------------------------

def _asm_edits(src, masked, report, path):
    edits = []
    for m in re.finditer(r"\b(?:asm|__asm__)\b(?:\s+(?:volatile|__volatile__))?\s*\(", masked):
        open_i = m.end() - 1
        close_i = match_forward(masked, open_i)
        body, mbody = src[open_i + 1:close_i - 1], masked[open_i + 1:close_i - 1]
        where = f"{path}:{line_of(src, m.start())}"
        template, ops = parse_asm(body, mbody)
        report.asm += 1
        code = emit_ptx(template, ops, report, where)
        edits.append((m.start(), close_i, keep_lines(src[m.start():close_i], code)))
    return edits


_ALIGN_RE = re.compile(r"(?:__align__|alignas)\s*\(([^()]*)\)|__attribute__\s*\(\(\s*aligned\s*\(([^()]*)\)\s*\)\)")


def _shared_edits(src, masked, report, path):
    edits = []
    for m in re.finditer(r"\b__shared__\b", masked):
        start = m.start()
        # `extern` / `static` right before it belong to the declaration
        pre = re.search(r"((?:\b(?:extern|static)\s+)+)$", masked[:start])
        is_extern = False
        if pre:
            is_extern = "extern" in pre.group(1)
            start = pre.start(1)
        end = start
        depth = 0
        while True:
            if end >= len(masked):
                raise TranslateError(f"{path}:{line_of(src, m.start())}: unterminated __shared__ declaration")
            c = masked[end]
            if c in "([{":
                depth += 1
            elif c in ")]}":
                depth -= 1
            elif c == ";" and depth == 0:
                break
            end += 1
        decl = src[m.end():end]
        align = None
        am = _ALIGN_RE.search(decl)
        if am:
            align = (am.group(1) or am.group(2)).strip()
            decl = decl[:am.start()] + " " + decl[am.end():]
        decl = re.sub(r"\bstatic\b", " ", decl)
        pieces = [p.strip() for p in split_top(decl, mask_code(decl), ",")]
        where = f"{path}:{line_of(src, m.start())}"
        first = re.fullmatch(r"(.*?[\w>*&\s])\s*\b(\w+)\s*((?:\[[^\]]*\]\s*)*)", pieces[0], re.S)
        if not first or not first.group(1).strip():
            raise TranslateError(f"{where}: cannot parse __shared__ declaration {squash(src[start:end])!r}")
        ctype = squash(first.group(1))
        decls = [(first.group(2), squash(first.group(3)))]
        for p in pieces[1:]:
            dm = re.fullmatch(r"(\w+)\s*((?:\[[^\]]*\]\s*)*)", p, re.S)
            if not dm:
                raise TranslateError(f"{where}: cannot parse __shared__ declarator {p!r}")
            decls.append((dm.group(1), squash(dm.group(2))))
        out = []
        for name, dims in decls:
            report.shared += 1
            if is_extern:
                if dims.replace(" ", "") != "[]":
                    raise TranslateError(f"{where}: extern __shared__ {name} must be an array of unknown bound")
                al = f"::std::max<size_t>({align}, alignof({ctype}))" if align else f"alignof({ctype})"
                out.append(f"{ctype}* const {name} = static_cast<{ctype}*>(::gptk_emu::dynamic_shared({al}))")
            else:
                full = f"{ctype} {dims}".strip()
                al = f"::std::max<size_t>({align}, alignof({full}))" if align else f"alignof({full})"
                tag = f"gptk_emu_tag_{name}"
                ref = f"{ctype} (&{name}){dims}" if dims else f"{ctype}& {name}"
                ptr = f"{ctype}(*){dims}" if dims else f"{ctype}*"
                out.append(f"static char {tag}; {ref} = *static_cast<{ptr}>(::gptk_emu::shared_var(&{tag}, "
                           f"sizeof({full}), {al}, \"{name}\"))")
        edits.append((start, end, keep_lines(src[start:end], "; ".join(out))))
    return edits


def _callee_start(masked: str, i: int) -> int:
    """Start of the kernel expression that ends just before masked[i] ('<<<')."""
    j = i - 1
    while j >= 0 and masked[j].isspace():
        j -= 1
    if j >= 0 and masked[j] == ">":  # template arguments
        depth = 0
        while j >= 0:
            c = masked[j]
            if c == ">":
                depth += 1
            elif c == "<":
                depth -= 1
                if depth == 0:
                    break
            j -= 1
        j -= 1
        while j >= 0 and masked[j].isspace():
            j -= 1
    while j >= 0 and (masked[j].isalnum() or masked[j] in "_:"):
        j -= 1
    start = j + 1
    if start >= i or not re.match(r"[\w:]", masked[start]):
        raise TranslateError("cannot find the kernel of a <<<...>>> launch")
    return start


def _launch_edits(src, masked, report, path):
    edits = []
    for m in re.finditer(r"<<<", masked):
        where = f"{path}:{line_of(src, m.start())}"
        try:
            start = _callee_start(masked, m.start())
        except TranslateError as e:
            raise TranslateError(f"{where}: {e}") from None
        depth, j = 0, m.end()
        while j < len(masked):
            c = masked[j]
            if c in "([{":
                depth += 1
            elif c in ")]}":
                depth -= 1
            elif depth == 0 and masked.startswith(">>>", j):
                break
            j += 1
        else:
            raise TranslateError(f"{where}: no '>>>' closes the launch")
        callee = squash(src[start:m.start()])
        cfg = squash(src[m.end():j])
        report.launches += 1
        edits.append((start, j + 3, keep_lines(src[start:j + 3], f"::gptk_emu::make_launcher({callee}, {cfg})")))
    return edits


def _kernel_edits(src, masked, report, path):
    edits = []
    for m in re.finditer(r"\b__global__\b", masked):
        j = m.end()
        bounds = None
        while True:
            nm = re.compile(r"\s*([A-Za-z_]\w*)\s*\(").search(masked, j)
            if not nm:
                raise TranslateError(f"{path}:{line_of(src, m.start())}: cannot find the kernel's parameter list")
            open_i = nm.end() - 1
            close_i = match_forward(masked, open_i)
            if nm.group(1) == "__launch_bounds__":
                bounds = src[open_i + 1:close_i - 1]
                j = close_i
                continue
            if nm.group(1) in ("__attribute__", "alignas", "__align__", "__declspec"):
                j = close_i
                continue
            break
        k = close_i
        while k < len(masked) and masked[k].isspace():
            k += 1
        if k >= len(masked) or masked[k] != "{":
            continue  # a declaration
        args = ["0", "0"]
        if bounds is not None:
            parts = [squash(p) for p in split_top(bounds, mask_code(bounds), ",")]
            for idx, p in enumerate(parts[:2]):
                args[idx] = f"(long long)({p})"
        report.kernels += 1
        edits.append((k + 1, k + 1, f" ::gptk_emu::kernel_entry(__PRETTY_FUNCTION__, {args[0]}, {args[1]});"))
    return edits


def translate(src: str, path: str) -> tuple[str, Report]:
    """The emulator C++ for the CUDA source `src` (read from `path`)."""
    report = Report()
    masked = mask_code(src)
    edits = []
    for f in (_asm_edits, _shared_edits, _launch_edits, _kernel_edits):
        edits += f(src, masked, report, path)
    edits.sort(key=lambda e: e[0])
    for a, b in zip(edits, edits[1:]):
        if a[1] > b[0]:
            raise TranslateError(f"{path}:{line_of(src, b[0])}: overlapping rewrites")
    out = src
    for s, e, text in reversed(edits):
        out = out[:s] + text + out[e:]
    assert out.count("\n") == src.count("\n")
    return f'#line 1 "{path}"\n' + out, report


def main(argv):
    if len(argv) != 3:
        print(__doc__)
        return 2
    src = Path(argv[1])
    text, report = translate(src.read_text(), str(src.resolve()))
    Path(argv[2]).write_text(text)
    print(f"{src}: {report.kernels} kernels, {report.launches} launches, {report.shared} __shared__, "
          f"{report.asm} asm ({len(report.unsupported_ptx)} not emulated)")
    for u in report.unsupported_ptx:
        print("  not emulated:", u)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
