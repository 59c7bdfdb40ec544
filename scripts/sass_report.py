"""Static performance report of the compiled kernels (docs/DESIGN.md §5).

Reads the SASS of one architecture (`cuobjdump -sass`), finds each kernel's
hot loops (the innermost loops that load from global memory; for the
single-read kernels kd_single_*, also those that load from shared memory)
and counts, per element of the row, the issue slots a warp spends along them:

* every instruction of the loop body is counted as issued, predicated-off
  ones included, and both sides of every branch inside the loop (the 32 lanes
  of a warp almost never agree on a data-dependent branch);
* blocks that only run on a rare path are listed apart with an assumed
  frequency: a slow-path subroutine call (the IEEE division's FCHK fallback)
  and blocks entered through a warp-uniform vote (`VOTE.ANY`/`VOTEU.ANY`: a
  branch taken only when some lane asks for it, such as a rescale of the
  running maximum);
* a loop whose loads bring 16 bytes per row is the vector body (the hot
  path of aligned rows); scalar heads, tails and the unaligned fallback are
  listed apart and not added.

Elements per iteration are the bytes the loop loads from global memory over
the bytes one element occupies in the rows it reads (student and teacher for
the dense kernels, the student for the top-k kernels). Slots per element are
the sum over the kernel's vector loops (one per pass over the row).

Single-read kernels (kd_single_*, kernels/kd/kd_single.cu): the first pass
loads global memory (LDG) and keeps a copy in shared memory (STS); the later
passes (JSD's and TVD's second sweep, the gradient) load that copy (LDS).
Their passes are the loops that load either, shared-memory bytes counted
like global ones, and they move 2·in + out bytes per element whatever their
number of passes (v1: 2·in per pass + out).

Pipes: MUFU (the special-function unit: EX2, LG2, RCP, RSQ, TANH ...), FMA
(FFMA, FADD, FMUL, IMAD, HFMA2 ...), ALU (compares, selects, min/max, logic,
shifts, moves), CVT (F2F, F2I, I2F, F2FP, FRND), MEM (loads, stores,
shuffles), CTRL (branches, barriers, convergence markers).

The prediction: an H100/H200 SM issues 4 warp-instructions per clock (132 SMs,
about 1.98 GHz: 33.5 T thread-instructions per second), its MUFU 16 lanes per
clock. A kernel's fraction of copy bandwidth is the floor's time over the
largest of its memory, issue and MUFU times (`predict`).
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict

# ------------------------------------------------------------------ parse --

_INSTR = re.compile(
    r"^\s*/\*(?P<addr>[0-9a-f]{4,})\*/\s+(?P<pred>@!?U?P[T0-9]+\s+)?(?P<op>[A-Z][A-Z0-9_.]*)(?P<rest>[^;]*);"
)
_FUNC = re.compile(r"^\s*Function\s*:\s*(?P<name>\S+)\s*$")
_TARGET = re.compile(r"(?:0x|`\(\.L_x_)([0-9a-f]+)")


@dataclasses.dataclass
class Instr:
    addr: int
    pred: str  # "" or e.g. "@!P0"
    op: str  # full opcode with modifiers, e.g. "LDG.E.128"
    operands: str

    @property
    def base(self) -> str:
        return self.op.split(".", 1)[0]


def parse_sass(text: str, keep=lambda name: True) -> dict[str, list[Instr]]:
    """Functions of a `cuobjdump -sass` listing (those `keep` accepts), with
    their instructions in address order."""
    funcs: dict[str, list[Instr]] = {}
    cur: list[Instr] | None = None
    for line in text.splitlines():
        if "Function" in line:
            m = _FUNC.match(line)
            if m:
                cur = funcs.setdefault(m.group("name"), []) if keep(m.group("name")) else None
                continue
        if cur is None:
            continue
        m = _INSTR.match(line)
        if m:
            pred = (m.group("pred") or "").strip()
            cur.append(Instr(int(m.group("addr"), 16), pred, m.group("op"), m.group("rest").strip()))
    return funcs


# -------------------------------------------------------------- classify --

MUFU = {"MUFU"}
FMA = {"FFMA", "FADD", "FMUL", "IMAD", "HFMA2", "HADD2", "HMUL2", "DFMA", "DADD", "DMUL", "FMUL2", "FFMA2", "FADD2"}
CVT = {"F2F", "F2I", "I2F", "I2FP", "F2FP", "FRND", "F2IP"}
MEM = {"LDG", "STG", "LDS", "STS", "LD", "ST", "LDL", "STL", "SHFL", "ATOMS", "ATOMG", "RED", "REDG", "LDC", "ULDC", "LDSM", "ATOM"}
CTRL = {"BRA", "BRX", "JMP", "JMX", "CALL", "RET", "EXIT", "BSSY", "BSYNC", "WARPSYNC", "BAR", "BREAK", "BPT",
        "YIELD", "NOP", "ENDCOLLECTIVE", "KILL", "WARPGROUP", "ACQBULK", "MEMBAR", "ERRBAR", "CCTL", "DEPBAR"}


def pipe(op: str) -> str:
    base = op.split(".", 1)[0]
    if base in MUFU:
        return "mufu"
    if base in FMA:
        return "fma"
    if base in CVT:
        return "cvt"
    if base in MEM:
        return "mem"
    if base in CTRL:
        return "ctrl"
    return "alu"


def load_bytes(ins: Instr, shared: bool = False) -> int:
    """Bytes one global load brings per thread (0 for anything else); with
    `shared`, the 16-byte shared-memory loads (LDS.128: a staged row's
    chunks) too, not the narrower ones (the top-k kernels' bit map)."""
    mods = ins.op.split(".")[1:]
    if shared and ins.base == "LDS":
        return 16 if "128" in mods else 0
    if ins.base != "LDG":
        return 0
    for m, b in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if m in mods:
            return b
    return 4


# ------------------------------------------------------------------- CFG --


@dataclasses.dataclass
class Block:
    start: int  # index of the first instruction
    end: int  # one past the last
    succ: list[int] = dataclasses.field(default_factory=list)
    pred: list[int] = dataclasses.field(default_factory=list)


def _branch_target(ins: Instr) -> int | None:
    """The address a branch jumps to: its last operand (`BRA 0x..`, `BRA P2,
    0x..`, `BRA.DIV UR4, 0x..`); None for a register target."""
    last = ins.operands.split(",")[-1].strip()
    m = _TARGET.search(last)
    return int(m.group(1), 16) if m and last.startswith(("0x", "`")) else None


def _falls_through(ins: Instr) -> bool:
    """Whether execution may continue after a branch: a predicated one, one
    with a predicate operand (`BRA P2, x`), or `BRA.DIV` (taken only when the
    warp has diverged)."""
    if ins.pred and ins.pred != "@PT":
        return True
    return ".DIV" in ins.op or "," in ins.operands


def build_cfg(code: list[Instr]) -> list[Block]:
    """Basic blocks and their edges. A CALL falls through (its callee is a
    separate subroutine); an unconditional BRA, EXIT or RET ends a path."""
    index = {ins.addr: i for i, ins in enumerate(code)}
    leaders = {0}
    for i, ins in enumerate(code):
        if ins.base in ("BRA", "BRX", "JMP", "JMX", "EXIT", "RET", "CALL"):
            if i + 1 < len(code):
                leaders.add(i + 1)
            t = _branch_target(ins) if ins.base in ("BRA", "JMP") else None
            if t is not None and t in index:
                leaders.add(index[t])
    starts = sorted(leaders)
    block_of = {}
    blocks = []
    for k, s in enumerate(starts):
        e = starts[k + 1] if k + 1 < len(starts) else len(code)
        block_of[s] = len(blocks)
        blocks.append(Block(s, e))
    for b_id, b in enumerate(blocks):
        last = code[b.end - 1]
        falls = True
        if last.base in ("BRA", "JMP"):
            t = _branch_target(last)
            if t is not None and t in index:
                b.succ.append(block_of[index[t]])
            falls = _falls_through(last)
        elif last.base in ("EXIT", "RET", "BRX", "JMX"):
            falls = bool(last.pred) and last.pred not in ("@PT",)
        if falls and b.end < len(code):
            b.succ.append(block_of[b.end])
    for b_id, b in enumerate(blocks):
        b.succ = sorted(set(b.succ))
        for s in b.succ:
            blocks[s].pred.append(b_id)
    return blocks


def dominators(blocks: list[Block]) -> list[int]:
    """Immediate dominators (Cooper, Harvey and Kennedy), -1 when unreachable."""
    order: list[int] = []
    seen = set()
    stack = [(0, iter(blocks[0].succ))] if blocks else []
    seen.add(0)
    while stack:
        node, it = stack[-1]
        nxt = next(it, None)
        if nxt is None:
            order.append(node)
            stack.pop()
        elif nxt not in seen:
            seen.add(nxt)
            stack.append((nxt, iter(blocks[nxt].succ)))
    rpo = order[::-1]
    num = {b: i for i, b in enumerate(rpo)}
    idom = [-1] * len(blocks)
    if not blocks:
        return idom
    idom[0] = 0

    def intersect(a: int, b: int) -> int:
        while a != b:
            while num[a] > num[b]:
                a = idom[a]
            while num[b] > num[a]:
                b = idom[b]
        return a

    changed = True
    while changed:
        changed = False
        for b in rpo[1:]:
            preds = [p for p in blocks[b].pred if idom[p] != -1 and p in num]
            if not preds:
                continue
            new = preds[0]
            for p in preds[1:]:
                new = intersect(p, new)
            if idom[b] != new:
                idom[b] = new
                changed = True
    return idom


def dominates(idom: list[int], a: int, b: int) -> bool:
    if idom[b] == -1:
        return False
    while True:
        if a == b:
            return True
        if b == 0:
            return a == 0
        b = idom[b]


@dataclasses.dataclass
class Loop:
    header: int
    body: set[int]
    latches: list[int]


def natural_loops(blocks: list[Block], idom: list[int]) -> list[Loop]:
    """One loop per header: the union of the natural loops of its back edges."""
    by_header: dict[int, Loop] = {}
    for u, b in enumerate(blocks):
        for v in b.succ:
            if dominates(idom, v, u):
                body = {v, u}
                work = [u]
                while work:
                    x = work.pop()
                    if x == v:
                        continue
                    for p in blocks[x].pred:
                        if p not in body and idom[p] != -1:
                            body.add(p)
                            work.append(p)
                lp = by_header.setdefault(v, Loop(v, set(), []))
                lp.body |= body
                lp.latches.append(u)
    return sorted(by_header.values(), key=lambda lp: lp.header)


# --------------------------------------------------------------- analyse --


def _rare_blocks(code: list[Instr], blocks: list[Block], body: set[int]) -> set[int]:
    """Blocks of a loop body on a rare path: those that call a slow-path
    subroutine, and those reached only through a branch on a warp vote."""
    rare = set()
    for b in body:
        blk = blocks[b]
        if any(code[i].base == "CALL" for i in range(blk.start, blk.end)):
            rare.add(b)
    # Vote-guarded regions: a block ending in a branch whose predicate was
    # set by VOTE(U).ANY in the same block; the taken side's blocks, up to
    # the join (the fall-through block), are rare.
    for b in body:
        blk = blocks[b]
        last = code[blk.end - 1]
        if last.base != "BRA" or not last.pred:
            continue
        p = last.pred.lstrip("@!")
        voted = any(
            code[i].base in ("VOTE", "VOTEU") and ".ANY" in code[i].op and p in code[i].operands.split(",")[0:2]
            for i in range(blk.start, blk.end - 1)
        )
        if not voted:
            continue
        t = _branch_target(last)
        taken = [s for s in blk.succ if code[blocks[s].start].addr == t]
        fall = [s for s in blk.succ if s not in taken]
        # `@P BRA x`: the taken side is the vote's rare side when the predicate
        # is positive; `@!P BRA x` skips the rare side, which is then the
        # fall-through.
        rare_entry = taken if not last.pred.startswith("@!") else fall
        join = fall if not last.pred.startswith("@!") else taken
        stop = set(join) | {b}
        work = list(rare_entry)
        while work:
            x = work.pop()
            if x in rare or x in stop or x not in body:
                continue
            rare.add(x)
            work.extend(blocks[x].succ)
    return rare


@dataclasses.dataclass
class LoopReport:
    first_addr: int
    last_addr: int
    load_bytes: int
    elements: float  # per iteration, per thread
    slots: int  # per iteration, rare blocks excluded, every branch side
    rare_slots: int
    min_path: int  # the cheapest single path through one iteration (a warp that agrees)
    max_path: int  # the dearest single path, rare blocks excluded
    mufu: int
    pipes: dict[str, int]
    vector: bool

    @property
    def per_element(self) -> float:
        return self.slots / self.elements if self.elements else float("inf")


def analyse_function(code: list[Instr], bytes_per_element: int, shared: bool = False) -> list[LoopReport]:
    """The hot loops of one function (innermost loops with global loads), in
    address order. `bytes_per_element`: what one element of the row occupies
    in the rows the loop reads (2·in for student + teacher). `shared`: loops
    that load shared memory (LDS) are hot loops too, their bytes counted as
    the global ones (the single-read kernels' later passes)."""
    if not code:
        return []
    blocks = build_cfg(code)
    idom = dominators(blocks)
    loops = natural_loops(blocks, idom)

    def loads(lp: Loop) -> int:
        return sum(load_bytes(code[i], shared) for b in lp.body for i in range(blocks[b].start, blocks[b].end))

    with_loads = [lp for lp in loops if loads(lp) > 0]
    inner = [lp for lp in with_loads if not any(o is not lp and o.body < lp.body for o in with_loads)]
    out = []
    for lp in inner:
        rare = _rare_blocks(code, blocks, lp.body)
        pipes: dict[str, int] = defaultdict(int)
        slots = rare_slots = 0
        for b in lp.body:
            for i in range(blocks[b].start, blocks[b].end):
                if b in rare:
                    rare_slots += 1
                else:
                    slots += 1
                    pipes[pipe(code[i].op)] += 1
        lb = loads(lp)
        addrs = [code[blocks[b].start].addr for b in lp.body]
        ends = [code[blocks[b].end - 1].addr for b in lp.body]
        vec = any(
            load_bytes(code[i], shared) == 16 for b in lp.body for i in range(blocks[b].start, blocks[b].end)
        )
        lo, hi = _path_extremes(blocks, lp, rare)
        out.append(
            LoopReport(
                min(addrs), max(ends), lb, lb / bytes_per_element, slots, rare_slots, lo, hi,
                pipes.get("mufu", 0), dict(pipes), vec,
            )
        )
    return out


def _path_extremes(blocks: list[Block], lp: Loop, rare: set[int]) -> tuple[int, int]:
    """Fewest and most instructions on one path from the loop header to a
    latch (back edges removed: the body is then acyclic). Rare blocks are
    left out of the longest path; the shortest may not avoid them."""
    size = {b: blocks[b].end - blocks[b].start for b in lp.body}
    latches = set(lp.latches)
    lo: dict[int, float] = {}
    hi: dict[int, float] = {}

    # Depth-first over the acyclic body, memoised; iterative to spare the
    # recursion limit on large bodies.
    # Each block is expanded once (a chain of diamonds would otherwise be
    # walked once per path: exponentially often).
    def solve(start: int) -> None:
        stack = [(start, False)]
        expanded: set[int] = set()
        while stack:
            b, done = stack.pop()
            if b in lo:
                continue
            succ = [s for s in blocks[b].succ if s in lp.body and s != lp.header]
            if not done:
                if b in expanded:
                    continue
                expanded.add(b)
                stack.append((b, True))
                stack.extend((s, False) for s in succ if s not in lo)
                continue
            ends_here = b in latches
            cand_lo = [lo[s] for s in succ if s in lo]
            cand_hi = [hi[s] for s in succ if s in hi and hi[s] >= 0]
            best_lo = min(cand_lo + ([0] if ends_here else []), default=float("inf"))
            best_hi = max(cand_hi + ([0] if ends_here else []), default=-1)
            lo[b] = size[b] + best_lo
            hi[b] = (size[b] + best_hi) if best_hi >= 0 and b not in rare else -1
    solve(lp.header)
    return int(lo[lp.header]), int(max(hi[lp.header], 0))


# ------------------------------------------------------------- predict --

# docs/DESIGN.md §5 and BENCHMARKS.md: nominal figures, not measurements.
DEVICES = {
    # name: (SMs, clock GHz, copy bandwidth TB/s)
    "H100": (132, 1.98, 3.0),
    "H200": (132, 1.98, 4.3),
}
ISSUE_PER_SM_CLOCK = 4 * 32  # 4 warp-instructions per clock per SM, in thread-instructions
MUFU_PER_SM_CLOCK = 16
ISSUE_EFFICIENCY = 0.75


def predict(slots: float, mufu: float, bytes_moved: float, floor_bytes: float, device: str) -> float:
    """Predicted fraction of the copy bandwidth: the floor's time (floor_bytes
    at the copy bandwidth) over the largest of the memory time (bytes_moved),
    the issue time (slots at 75% issue efficiency) and the MUFU time."""
    sms, ghz, tbs = DEVICES[device]
    clock = sms * ghz * 1e9
    t_floor = floor_bytes / (tbs * 1e12)
    t_mem = bytes_moved / (tbs * 1e12)
    t_issue = slots / (clock * ISSUE_PER_SM_CLOCK * ISSUE_EFFICIENCY)
    t_mufu = mufu / (clock * MUFU_PER_SM_CLOCK)
    return t_floor / max(t_mem, t_issue, t_mufu)


# ---------------------------------------------------------------- kernels --

_KERNEL = re.compile(r"^kd_(?:(?P<kind>fused|single)_(?P<div>[a-z]+)_(?:(?P<var>fast|fastce)_)?|topk_)(?P<inp>f32|bf16|f16)_(?P<out>f32|bf16|f16)(?:_(?P<idx>i32|i64))?$")
DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2}


@dataclasses.dataclass
class KernelReport:
    name: str
    registers: int | None
    occupancy: float | None  # resident warps over the SM's 64, 256-thread blocks
    passes: list[LoopReport]  # vector loops, in address order
    scalar_loops: int
    slots: float  # per element, all passes, every branch side
    max_path: float  # per element, all passes, the dearest single path
    mufu: float
    rare: float  # per element, rare blocks (listed apart)
    pipes: dict[str, float]
    bytes_moved: int  # per element, re-reads missing L2 (docs/DESIGN.md §5); single-read: 2·in + out (top-k: in + out)
    floor_bytes: int
    predicted: dict[str, float]


def occupancy(registers: int, threads: int = 256) -> float:
    """Resident warps per SM over 64 (sm_90: 64K registers, allocated per warp
    in units of 256)."""
    per_warp = -(-registers * 32 // 256) * 256
    warps_per_block = threads // 32
    blocks = min(65536 // (per_warp * warps_per_block), 32)
    return min(blocks * warps_per_block, 64) / 64


def parse_registers(text: str) -> dict[str, int]:
    """REG of each function in a `cuobjdump -res-usage` listing."""
    out = {}
    name = None
    for line in text.splitlines():
        m = re.match(r"^\s*Function\s+(\S+):\s*$", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"\bREG:(\d+)", line)
        if m and name:
            out[name] = int(m.group(1))
            name = None
    return out


def report_kernel(name: str, code: list[Instr], registers: int | None) -> KernelReport | None:
    m = _KERNEL.match(name)
    if not m:
        return None
    inb, outb = DTYPE_BYTES[m.group("inp")], DTYPE_BYTES[m.group("out")]
    # kd_topk_* (v1) and kd_single_topk_* read one dense row: the student.
    topk = m.group("div") in (None, "topk")
    single = m.group("kind") == "single"
    rows = 1 if topk else 2
    loops = analyse_function(code, rows * inb, shared=single)
    vec = [lp for lp in loops if lp.vector]
    slots = sum(lp.per_element for lp in vec)
    mx = sum(lp.max_path / lp.elements for lp in vec)
    mufu = sum(lp.mufu / lp.elements for lp in vec)
    rare = sum(lp.rare_slots / lp.elements for lp in vec)
    pipes: dict[str, float] = defaultdict(float)
    for lp in vec:
        for k, v in lp.pipes.items():
            pipes[k] += v / lp.elements
    # v1 reads the row once per pass; single-read once, its later passes
    # reading the shared-memory copy.
    moved = (1 if single else len(vec)) * rows * inb + outb
    floor = rows * inb + outb
    pred = {d: predict(slots, mufu, moved, floor, d) for d in DEVICES}
    return KernelReport(
        name, registers, occupancy(registers) if registers else None, vec, len(loops) - len(vec),
        slots, mx, mufu, rare, dict(pipes), moved, floor, pred,
    )


# ------------------------------------------------------ selection kernels --

# The per-row top-k selection (kernels/topk_select/select.cu, docs/DESIGN.md
# §9): outside the instruction budget, reported apart. Its loops read one
# element per thread (scalar loads), in address order: pass 0 (keys,
# histogram, log-sum-exp), the refinement pass (run 0 to 3 times: the next
# byte of the keys in the threshold bucket), the compaction (re-reads the row
# until all k winners are found), and the winners' values (per winner, not
# per element).
_SELECT = re.compile(r"^kd_select_(?P<inp>f32|bf16|f16)$")
SELECT_LOOPS = ("pass 0", "refinement", "compaction", "winners' values")


@dataclasses.dataclass
class SelectReport:
    name: str
    registers: int | None
    loops: list[LoopReport]  # every hot loop, in address order
    labels: list[str]
    min_slots: float  # per element: pass 0 + compaction (no refinement)
    max_slots: float  # per element: pass 0 + 3 refinements + compaction
    mufu: float
    predicted_min: dict[str, float]  # fewest passes: 2 reads of the row
    predicted_max: dict[str, float]  # most passes: 5 reads


def report_select(name: str, code: list[Instr], registers: int | None) -> SelectReport | None:
    m = _SELECT.match(name)
    if not m:
        return None
    inb = DTYPE_BYTES[m.group("inp")]
    loops = analyse_function(code, inb)
    if len(loops) == len(SELECT_LOOPS):
        labels = list(SELECT_LOOPS)
        p0, ref, comp = (lp.per_element for lp in loops[:3])
        lo, hi = p0 + comp, p0 + 3 * ref + comp
        mufu = loops[0].mufu / loops[0].elements + loops[2].mufu / loops[2].elements
    else:  # not the structure select.cu describes: list the loops only
        labels = [f"loop {i}" for i in range(len(loops))]
        lo = hi = float("nan")
        mufu = sum(lp.mufu / lp.elements for lp in loops)
    pred_lo = {d: predict(lo, mufu, 2 * inb, inb, d) for d in DEVICES}
    pred_hi = {d: predict(hi, mufu, 5 * inb, inb, d) for d in DEVICES}
    return SelectReport(name, registers, loops, labels, lo, hi, mufu, pred_lo, pred_hi)


def select_table(reports: list[SelectReport]) -> str:
    head = (
        "| kernel | regs | loop | elements/iter | slots/elem | max path | MUFU/elem |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in reports:
        for label, lp in zip(r.labels, r.loops):
            rows.append(
                f"| {r.name} | {r.registers or '?'} | {label} | {lp.elements:g} | {lp.per_element:.1f} |"
                f" {lp.max_path / lp.elements:.1f} | {lp.mufu / lp.elements:.2f} |"
            )
        rows.append(
            f"| {r.name} | | **per element, all passes** | | **{r.min_slots:.0f}–{r.max_slots:.0f}** | |"
            f" {r.mufu:.2f} |"
        )
    def span(r: SelectReport, d: str) -> str:
        lo, hi = f"{r.predicted_max[d] * 100:.0f}", f"{r.predicted_min[d] * 100:.0f}"
        return f"{lo}%" if lo == hi else f"{lo}–{hi}%"

    preds = "".join(
        f"\n{r.name}: predicted fraction of copy bandwidth H100 {span(r, 'H100')}, "
        f"H200 {span(r, 'H200')} (a prediction)"
        for r in reports
    )
    return head + "\n".join(rows) + "\n" + preds + "\n"


def select_json(reports: list[SelectReport]) -> list[dict]:
    return [
        {
            "name": r.name,
            "registers": r.registers,
            "loops": [
                {
                    "label": label,
                    "addr": [hex(lp.first_addr), hex(lp.last_addr)],
                    "elements_per_iteration": lp.elements,
                    "slots_per_element": round(lp.per_element, 2),
                    "max_path_per_element": round(lp.max_path / lp.elements, 2),
                    "mufu_per_element": round(lp.mufu / lp.elements, 3),
                    "pipes_per_iteration": lp.pipes,
                }
                for label, lp in zip(r.labels, r.loops)
            ],
            "slots_per_element_min": round(r.min_slots, 2),
            "slots_per_element_max": round(r.max_slots, 2),
            "mufu_per_element": round(r.mufu, 3),
            "predicted_fraction_of_copy_bandwidth_min_passes": {k: round(v, 3) for k, v in r.predicted_min.items()},
            "predicted_fraction_of_copy_bandwidth_max_passes": {k: round(v, 3) for k, v in r.predicted_max.items()},
        }
        for r in reports
    ]


# ---------------------------------------------------------------- budgets --


def load_budgets(path: str) -> list[dict]:
    import tomllib

    with open(path, "rb") as f:
        data = tomllib.load(f)
    out = data.get("budget", [])
    for b in out:
        for key in ("kernels", "slots"):
            if key not in b:
                raise ValueError(f"{path}: a [[budget]] without `{key}`")
    return out


def match_budget(budgets: list[dict], name: str) -> dict | None:
    import fnmatch

    for b in budgets:
        pats = b["kernels"] if isinstance(b["kernels"], list) else [b["kernels"]]
        if any(fnmatch.fnmatchcase(name, p) for p in pats):
            return b
    return None


def check_budgets(reports: list[KernelReport], budgets: list[dict]) -> tuple[list[str], list[str]]:
    """(failures, pending): kernels over their budget, and budgets no kernel
    matches yet."""
    failures = []
    used = set()
    for r in reports:
        b = match_budget(budgets, r.name)
        if b is None:
            continue
        used.add(id(b))
        if r.slots > b["slots"]:
            failures.append(f"{r.name}: {r.slots:.1f} issue slots per element > budget {b['slots']} ({b.get('what', '')})")
        if "mufu" in b and r.mufu > b["mufu"]:
            failures.append(f"{r.name}: {r.mufu:.2f} MUFU per element > budget {b['mufu']} ({b.get('what', '')})")
    pending = [f"{b['kernels']}: {b.get('what', '')}" for b in budgets if id(b) not in used]
    return failures, pending


# ------------------------------------------------------------------ output --


def table(reports: list[KernelReport]) -> str:
    head = (
        "| kernel | regs | occ. | passes | slots/elem (per pass) | max path | MUFU | FMA | ALU | CVT | MEM | CTRL |"
        " rare | B/elem | H100 | H200 |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in reports:
        per = " + ".join(f"{lp.per_element:.0f}" for lp in r.passes)
        p = r.pipes
        rows.append(
            f"| {r.name} | {r.registers or '?'} | {(r.occupancy or 0) * 100:.0f}% | {len(r.passes)} |"
            f" **{r.slots:.1f}** ({per}) | {r.max_path:.1f} | {r.mufu:.2f} | {p.get('fma', 0):.1f} |"
            f" {p.get('alu', 0):.1f} | {p.get('cvt', 0):.1f} | {p.get('mem', 0):.2f} | {p.get('ctrl', 0):.1f} |"
            f" {r.rare:.1f} | {r.bytes_moved} | {r.predicted['H100'] * 100:.0f}% | {r.predicted['H200'] * 100:.0f}% |"
        )
    return head + "\n".join(rows) + "\n"


def to_json(reports: list[KernelReport], meta: dict) -> dict:
    def lp(x: LoopReport) -> dict:
        return {
            "addr": [hex(x.first_addr), hex(x.last_addr)],
            "elements_per_iteration": x.elements,
            "slots_per_iteration": x.slots,
            "slots_per_element": round(x.per_element, 2),
            "max_path_per_iteration": x.max_path,
            "min_path_per_iteration": x.min_path,
            "rare_slots_per_iteration": x.rare_slots,
            "pipes_per_iteration": x.pipes,
        }

    return {
        **meta,
        "kernels": [
            {
                "name": r.name,
                "registers": r.registers,
                "occupancy": r.occupancy,
                "slots_per_element": round(r.slots, 2),
                "max_path_per_element": round(r.max_path, 2),
                "mufu_per_element": round(r.mufu, 3),
                "rare_slots_per_element": round(r.rare, 2),
                "pipes_per_element": {k: round(v, 2) for k, v in r.pipes.items()},
                "bytes_per_element": r.bytes_moved,
                "floor_bytes_per_element": r.floor_bytes,
                "predicted_fraction_of_copy_bandwidth": {k: round(v, 3) for k, v in r.predicted.items()},
                "passes": [lp(x) for x in r.passes],
                "scalar_loops": r.scalar_loops,
            }
            for r in reports
        ],
    }
