"""Tests of scripts/sass_report.py on small hand-written SASS listings:
the counts move when an instruction is planted in a hot loop, both sides of
a branch inside it are counted, rare paths are set apart and scalar loops
are not added."""

import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sass_report as sr  # noqa: E402


def listing(name: str, body: list[str]) -> str:
    """A function of `cuobjdump -sass` shape; `body` lines are instructions
    (`OP operands` or `@P0 OP operands`), `BRA L<k>` naming the k-th line."""
    lines = [f"\t\tFunction : {name}"]
    for i, ins in enumerate(body):
        for k in range(len(body)):
            ins = ins.replace(f"L{k}>", f"{k * 16:#x}")
        lines.append(f"        /*{i * 16:04x}*/                   {ins} ;   /* 0x0 */")
    return "\n".join(lines) + "\n"


# A bf16 kernel: a vector loop (two 16-byte loads: 8 elements) of `n` extra
# instructions, then EXIT.
def vector_kernel(extra: list[str]) -> list[str]:
    return (
        [
            "MOV R0, RZ",  # 0
            "LDG.E.128 R4, desc[UR4][R2.64]",  # 1: loop header
            "LDG.E.128 R8, desc[UR4][R12.64]",  # 2
        ]
        + extra
        + [
            "ISETP.GE.AND P0, PT, R0, R1, PT",
            "@!P0 BRA L1>",
            "EXIT",
        ]
    )


class SassReport(unittest.TestCase):
    def analyse(self, body, rows=2, inb=2):
        code = sr.parse_sass(listing("kd_fused_fkl_bf16_bf16", body))["kd_fused_fkl_bf16_bf16"]
        return sr.analyse_function(code, rows * inb)

    def test_vector_loop_counted_per_element(self):
        (lp,) = self.analyse(vector_kernel(["FFMA R4, R4, R5, R6"] * 6))
        self.assertTrue(lp.vector)
        self.assertEqual(lp.elements, 8)
        # 2 loads + 6 FFMA + ISETP + BRA
        self.assertEqual(lp.slots, 10)
        self.assertEqual(lp.pipes["fma"], 6)

    def test_planted_instruction_changes_the_count(self):
        (a,) = self.analyse(vector_kernel(["FFMA R4, R4, R5, R6"] * 6))
        (b,) = self.analyse(vector_kernel(["FFMA R4, R4, R5, R6"] * 6 + ["MUFU.EX2 R7, R7"]))
        self.assertEqual(b.slots - a.slots, 1)
        self.assertEqual(b.mufu - a.mufu, 1)
        self.assertAlmostEqual(b.per_element - a.per_element, 1 / 8)

    def test_planted_branch_counts_both_sides(self):
        # if (p) { 3 FMUL } else { 5 FADD }: both sides issue for a warp whose
        # lanes disagree.
        base = 3  # index of the first extra instruction
        extra = [
            "FSETP.GT.AND P1, PT, R4, R5, PT",  # base
            f"@P1 BRA L{base + 7}>",  # base+1: to the then-side
            "FADD R4, R4, R5",  # base+2 .. base+6: else-side
            "FADD R4, R4, R5",
            "FADD R4, R4, R5",
            "FADD R4, R4, R5",
            f"BRA L{base + 10}>",  # base+6: to the join
            "FMUL R4, R4, R5",  # base+7 .. base+9: then-side
            "FMUL R4, R4, R5",
            "FMUL R4, R4, R5",
            "MOV R6, R4",  # base+10: join
        ]
        (lp,) = self.analyse(vector_kernel(extra))
        self.assertEqual(lp.pipes["fma"], 4 + 3)
        # loads 2 + FSETP + BRA + 4 FADD + BRA + 3 FMUL + MOV + ISETP + BRA
        self.assertEqual(lp.slots, 15)
        # One path: the else-side is dearer (5 with its BRA) than the then-side (3).
        self.assertEqual(lp.max_path, 15 - 3)
        self.assertEqual(lp.min_path, 15 - 5)

    def test_vote_guarded_block_is_rare(self):
        base = 3
        extra = [
            "FSETP.GT.AND P1, PT, R4, R5, PT",
            "VOTE.ANY P2, P1",
            f"@!P2 BRA L{base + 6}>",  # no lane asked: skip the rescale
            "MUFU.EX2 R7, R7",  # rare: the rescale
            "FMUL R4, R4, R7",
            "FMUL R5, R5, R7",
            "MOV R6, R4",  # join
        ]
        (lp,) = self.analyse(vector_kernel(extra))
        self.assertEqual(lp.rare_slots, 3)
        self.assertEqual(lp.mufu, 0)

    def test_slow_path_call_is_rare(self):
        base = 3
        extra = [
            "FCHK P1, R4, R5",
            f"@!P1 BRA L{base + 3}>",
            "CALL.REL.NOINC 0x1000",
            "FMUL R4, R4, R5",
        ]
        (lp,) = self.analyse(vector_kernel(extra))
        self.assertEqual(lp.rare_slots, 1)

    def test_scalar_loop_is_not_a_pass(self):
        body = [
            "MOV R0, RZ",
            "LDG.E.U16 R4, desc[UR4][R2.64]",  # 1: scalar loop
            "LDG.E.U16 R5, desc[UR4][R12.64]",
            "FFMA R4, R4, R5, R6",
            "ISETP.GE.AND P0, PT, R0, R1, PT",
            "@!P0 BRA L1>",
        ] + vector_kernel(["FFMA R4, R4, R5, R6"])[1:]
        text = listing("kd_fused_fkl_bf16_bf16", [b.replace("L1>", "L6>") if i >= 6 else b for i, b in enumerate(body)])
        code = sr.parse_sass(text)["kd_fused_fkl_bf16_bf16"]
        r = sr.report_kernel("kd_fused_fkl_bf16_bf16", code, 40)
        self.assertEqual(r.scalar_loops, 1)
        self.assertEqual(len(r.passes), 1)
        # 2 loads + FFMA + ISETP + BRA over 8 elements
        self.assertAlmostEqual(r.slots, 5 / 8)

    def test_selection_kernel_loops_are_labelled_and_summed(self):
        # Four scalar f32 loops of 3, 5, 7 and 4 instructions per element
        # (load + n FFMA + ISETP + BRA): pass 0, refinement, compaction,
        # winners' values.
        body, starts = ["MOV R0, RZ"], []
        for extra in (0, 2, 4, 1):
            starts.append(len(body))
            body += ["LDG.E R4, desc[UR4][R2.64]"] + ["FFMA R4, R4, R5, R6"] * extra
            body += ["ISETP.GE.AND P0, PT, R0, R1, PT", f"@!P0 BRA L{starts[-1]}>"]
        body.append("EXIT")
        code = sr.parse_sass(listing("kd_select_f32", body))["kd_select_f32"]
        r = sr.report_select("kd_select_f32", code, 40)
        self.assertEqual(r.labels, list(sr.SELECT_LOOPS))
        self.assertEqual([lp.per_element for lp in r.loops], [3, 5, 7, 4])
        self.assertEqual(r.min_slots, 3 + 7)
        self.assertEqual(r.max_slots, 3 + 3 * 5 + 7)
        self.assertIsNone(sr.report_select("kd_fused_fkl_f32_f32", code, 40))
        self.assertIn("winners' values", sr.select_table([r]))

    def test_loop_after_a_divergence_branch_is_found(self):
        # `BRA.DIV` (taken only when the warp diverged, as before a shuffle)
        # and `BRA P1, x` fall through: the loop behind them is reachable.
        body = [
            "MOV R0, RZ",  # 0
            "BRA.DIV UR4, L9>",  # 1
            "@P0 BRA P1, L9>",  # 2
            "LDG.E.128 R4, desc[UR4][R2.64]",  # 3: loop header
            "LDG.E.128 R8, desc[UR4][R12.64]",  # 4
            "FFMA R4, R4, R5, R6",  # 5
            "ISETP.GE.AND P0, PT, R0, R1, PT",  # 6
            "@!P0 BRA L3>",  # 7
            "EXIT",  # 8
            "SHFL.BFLY PT, R0, R0, 0x1, 0x1f",  # 9
            "BRA L3>",  # 10
        ]
        loops = [lp for lp in self.analyse(body) if lp.vector]
        self.assertEqual(len(loops), 1)
        self.assertEqual(loops[0].slots, 5)

    def test_a_long_chain_of_branches_is_walked_once(self):
        # 40 diamonds in one loop body: 2^40 paths, one walk.
        extra = []
        for _ in range(40):
            k = len(extra) + 3
            extra += [f"@P1 BRA L{k + 2}>", "FADD R4, R4, R5", "FMUL R4, R4, R5"]
        (lp,) = self.analyse(vector_kernel(extra))
        self.assertEqual(lp.slots, 2 + 120 + 2)
        self.assertEqual(lp.max_path, 2 + 120 + 2)

    def single_read_kernel(self, later_passes: int) -> list[str]:
        """A single-read kernel: pass 1 loads global memory (two 16-byte
        LDG) and stores the copy to shared memory (two STS); `later_passes`
        loops load the copy (two 16-byte LDS), the last one storing the
        gradient."""
        body = [
            "MOV R0, RZ",  # 0
            "LDG.E.128 R4, desc[UR4][R2.64]",  # 1: pass 1
            "LDG.E.128 R8, desc[UR4][R12.64]",  # 2
            "STS.128 [R14], R4",  # 3
            "STS.128 [R14+0x1000], R8",  # 4
            "FFMA R4, R4, R5, R6",  # 5
            "ISETP.GE.AND P0, PT, R0, R1, PT",  # 6
            "@!P0 BRA L1>",  # 7
            "BAR.SYNC.DEFER_BLOCKING 0x0",  # 8
        ]
        for k in range(later_passes):
            top = len(body)
            body += [
                "LDS.128 R4, [R14]",  # top
                "LDS.128 R8, [R14+0x1000]",
                "FFMA R4, R4, R5, R6",
                "FFMA R4, R4, R5, R6",
            ]
            if k == later_passes - 1:
                body += ["STG.E.128 desc[UR4][R16.64], R4"]
            body += ["ISETP.GE.AND P0, PT, R0, R1, PT", f"@!P0 BRA L{top}>", "BAR.SYNC.DEFER_BLOCKING 0x0"]
        return body + ["EXIT"]

    def test_kernel_names(self):
        for name, div, var in (
            ("kd_single_fkl_bf16_bf16", "fkl", None),
            ("kd_single_jsd_fast_f32_f32", "jsd", "fast"),
            ("kd_single_sce_fastce_bf16_f32", "sce", "fastce"),
        ):
            m = sr._KERNEL.match(name)
            self.assertIsNotNone(m, name)
            self.assertEqual((m.group("kind"), m.group("div"), m.group("var")), ("single", div, var))
        self.assertEqual(sr._KERNEL.match("kd_fused_fkl_fast_bf16_bf16").group("kind"), "fused")
        self.assertIsNone(sr._KERNEL.match("kd_topk_bf16_bf16").group("kind"))
        self.assertIsNone(sr._KERNEL.match("kd_single_layout"))

    def test_single_read_counts_shared_memory_passes(self):
        # JSD's shape: pass 1 from global memory, pass 2 and the gradient
        # from the shared-memory copy: three passes of 8 elements each.
        name = "kd_single_jsd_fast_bf16_bf16"
        code = sr.parse_sass(listing(name, self.single_read_kernel(2)))[name]
        r = sr.report_kernel(name, code, 64)
        self.assertEqual(len(r.passes), 3)
        self.assertEqual(r.scalar_loops, 0)
        self.assertEqual([lp.elements for lp in r.passes], [8, 8, 8])
        # pass 1: 2 LDG + 2 STS + FFMA + ISETP + BRA; pass 2: 2 LDS + 2 FFMA
        # + ISETP + BRA; gradient: the same + STG.
        self.assertEqual([lp.slots for lp in r.passes], [7, 6, 7])
        self.assertAlmostEqual(r.slots, 20 / 8)
        self.assertAlmostEqual(r.pipes["mem"], (4 + 2 + 3) / 8)
        # Each logit read once: 2·in + out, whatever the number of passes.
        self.assertEqual(r.bytes_moved, 2 * 2 + 2)
        self.assertEqual(r.floor_bytes, 6)
        self.assertAlmostEqual(r.predicted["H100"], 1.0)

    def test_single_read_bytes_per_dtype(self):
        for name, moved in (
            ("kd_single_fkl_fast_bf16_bf16", 6),
            ("kd_single_fkl_fast_bf16_f32", 8),
            ("kd_single_fkl_fast_f32_f32", 12),
            ("kd_single_fkl_bf16_bf16", 6),
        ):
            code = sr.parse_sass(listing(name, self.single_read_kernel(1)))[name]
            r = sr.report_kernel(name, code, 56)
            self.assertEqual(len(r.passes), 2, name)
            self.assertEqual(r.bytes_moved, moved, name)
            self.assertEqual(r.floor_bytes, moved, name)

    def test_v1_does_not_count_shared_memory_loops(self):
        # The same code under a v1 name: only the LDG loop is a pass, and
        # v1's bytes are 2·in per pass + out.
        name = "kd_fused_jsd_fast_bf16_bf16"
        code = sr.parse_sass(listing(name, self.single_read_kernel(2)))[name]
        r = sr.report_kernel(name, code, 64)
        self.assertEqual(len(r.passes), 1)
        self.assertAlmostEqual(r.slots, 7 / 8)
        self.assertEqual(r.bytes_moved, 6)
        self.assertEqual(sr.load_bytes(code[9]), 0)
        self.assertEqual(sr.load_bytes(code[9], shared=True), 16)

    def test_budget_check_fails_over_budget(self):
        code = sr.parse_sass(listing("kd_fused_fkl_bf16_bf16", vector_kernel(["FFMA R4, R4, R5, R6"] * 62)))
        r = sr.report_kernel("kd_fused_fkl_bf16_bf16", code["kd_fused_fkl_bf16_bf16"], 40)
        self.assertAlmostEqual(r.slots, 66 / 8)
        over, pending = sr.check_budgets([r], [{"kernels": "kd_fused_fkl_*", "slots": 8}])
        self.assertEqual(len(over), 1)
        self.assertEqual(pending, [])
        over, _ = sr.check_budgets([r], [{"kernels": "kd_fused_fkl_*", "slots": 9}])
        self.assertEqual(over, [])
        _, pending = sr.check_budgets([r], [{"kernels": "kd_fused_jsd_*", "slots": 9}])
        self.assertEqual(len(pending), 1)

    def test_prediction_is_bounded_by_the_slowest_resource(self):
        # Memory-bound at the floor: 100%.
        self.assertAlmostEqual(sr.predict(1, 0, 6, 6, "H100"), 1.0)
        # Twice the floor's bytes: 50%.
        self.assertAlmostEqual(sr.predict(1, 0, 12, 6, "H100"), 0.5)
        # 100 slots per element at 6 B: issue-bound, well under 1.
        self.assertLess(sr.predict(100, 0, 6, 6, "H200"), 0.5)

    def test_occupancy(self):
        self.assertEqual(sr.occupancy(64), 0.5)
        self.assertEqual(sr.occupancy(32), 1.0)
        self.assertEqual(sr.occupancy(72), 0.375)


if __name__ == "__main__":
    unittest.main()
